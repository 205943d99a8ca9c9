//! Docker Engine through the mirror, with a real dockerd (Debian's docker.io, loopback only:
//! `--bridge=none --iptables=false`, private data and exec roots, its own socket and pid file),
//! the node agent's loop (runtime `Docker`, in process) and the real cachalot registry (in
//! process) over a real distribution upstream: the agent merges the mirror into the
//! administrator's `daemon.json` and sends dockerd `SIGHUP`, dockerd lists the mirror without a
//! restart, `docker pull` of a Docker Hub image goes through the mirror, and when the mirror is
//! removed the agent takes its entry out and reloads dockerd again: the administrator's
//! configuration is back (with `"registry-mirrors": []`, which a reload needs).
//!
//! Proxy variables point at a closed local port, so if dockerd ever went past the mirror to
//! Docker Hub, the attempt would fail on this machine instead of leaving it.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use cachalot_operator::node_agent::protocol::{DesiredState, RegistryState, Runtime};
use cachalot_operator::node_agent::Args;
use cachalot_registry::config::{Config, RegistryConfig};
use cachalot_registry::server::Server;
use cachalot_testkit::distribution::Distribution;
use cachalot_testkit::image::{docker_image, push};
use cachalot_testkit::process::LoggedChild;
use cachalot_testkit::wait::{free_port, wait_until};

mod common;
use common::node::{agent_args, desired, NodeDirs, RunningAgent};

const DOCKERD: &str = "/usr/sbin/dockerd";
const DOCKER: &str = "/usr/bin/docker";

fn missing() -> Option<String> {
    if !Path::new(DOCKERD).exists() || !Path::new(DOCKER).exists() {
        return Some("dockerd is not installed: run scripts/install-test-deps".into());
    }
    if !nix::unistd::geteuid().is_root() {
        return Some("dockerd needs root".into());
    }
    None
}

struct Dockerd {
    child: LoggedChild,
    socket: PathBuf,
    pid_file: PathBuf,
}

impl Dockerd {
    async fn start(dir: &Path, config: &Path) -> Dockerd {
        let socket = dir.join("docker.sock");
        let pid_file = dir.join("docker.pid");
        let mut command = Command::new(DOCKERD);
        command
            .arg("--config-file")
            .arg(config)
            .arg("--data-root")
            .arg(dir.join("data"))
            .arg("--exec-root")
            .arg(dir.join("exec"))
            .arg("--pidfile")
            .arg(&pid_file)
            .arg("-H")
            .arg(format!("unix://{}", socket.display()))
            .args([
                "--bridge=none",
                "--iptables=false",
                "--ip6tables=false",
                "--storage-driver=vfs",
            ])
            .env("HTTP_PROXY", "http://127.0.0.1:9")
            .env("HTTPS_PROXY", "http://127.0.0.1:9")
            .env("NO_PROXY", "127.0.0.1,localhost");
        let mut child = LoggedChild::spawn(&mut command, &dir.join("dockerd.log")).unwrap();
        let sock = socket.clone();
        child
            .wait_ready(Duration::from_secs(60), Duration::from_millis(50), || {
                let ok = docker(&sock, &["version", "--format", "{{.Server.Version}}"])
                    .status
                    .success();
                async move { ok }
            })
            .await
            .unwrap_or_else(|e| panic!("dockerd did not start: {e}\n{}", child.log_tail()));
        Dockerd {
            child,
            socket,
            pid_file,
        }
    }

    /// The mirrors dockerd uses now.
    fn mirrors(&self) -> String {
        let out = docker(
            &self.socket,
            &["info", "--format", "{{json .RegistryConfig.Mirrors}}"],
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    async fn stop(mut self) {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.child.id()).unwrap());
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let child = &mut self.child;
        let stopped = wait_until(Duration::from_secs(30), Duration::from_millis(50), || {
            let exited = child.try_wait().unwrap().is_some();
            async move { exited }
        })
        .await;
        if stopped.is_err() {
            let _ = self.child.kill();
        }
    }
}

fn docker(socket: &Path, args: &[&str]) -> std::process::Output {
    Command::new(DOCKER)
        .arg("-H")
        .arg(format!("unix://{}", socket.display()))
        .args(args)
        .output()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_puts_the_mirror_into_dockerd_and_takes_it_out_again() {
    if !cachalot_testkit::prerequisites::run_or_skip(
        "the_agent_puts_the_mirror_into_dockerd_and_takes_it_out_again",
        missing(),
    ) {
        return;
    }
    let node = NodeDirs::new();
    let tmp = tempfile::Builder::new().prefix("dk").tempdir().unwrap();
    let upstream = Distribution::start().await.unwrap();
    let image = docker_image(31, &[64 * 1024]).unwrap();
    push(&upstream.url(), "library/demo", "v1", &image)
        .await
        .unwrap();

    // The cachalot registry: docker.io (the default registry) is the distribution upstream.
    let mut config = Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        ..Config::default()
    };
    config.storage.path = tmp.path().join("cache");
    config.registries.insert(
        "docker.io".into(),
        RegistryConfig {
            url: Some(upstream.url()),
            ..RegistryConfig::default()
        },
    );
    config.normalise();
    config.validate().unwrap();
    let server = Server::bind(&config).await.unwrap();
    let mirror = format!("http://{}", server.local_addr().unwrap());
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(server.run(async {
        let _ = stop_rx.await;
    }));

    // The administrator's daemon.json, and dockerd running with it.
    let docker_dir = tmp.path().join("etc-docker");
    std::fs::create_dir(&docker_dir).unwrap();
    let daemon_json = docker_dir.join("daemon.json");
    let admin = "{\n  \"log-level\": \"warn\",\n  \"max-concurrent-downloads\": 2\n}\n";
    std::fs::write(&daemon_json, admin).unwrap();
    let dockerd = Dockerd::start(tmp.path(), &daemon_json).await;
    assert_eq!(dockerd.mirrors(), "[]", "no mirror before the agent runs");

    // The agent, runtime Docker, with dockerd's pid file.
    let docker_desired = |generation: &str, removing: bool| DesiredState {
        runtime: Runtime::Docker,
        removing,
        ..desired(generation, vec![mirror.clone()])
    };
    node.write_desired(&docker_desired("g1", false));
    let agent = RunningAgent::spawn(Args {
        docker_config: Some(daemon_json.clone()),
        host_docker_config: Some("/etc/docker/daemon.json".into()),
        docker_pid_file: Some(dockerd.pid_file.clone()),
        ..agent_args(&node, free_port().unwrap())
    });
    let status = agent
        .wait("docker.io configured through daemon.json", |s| {
            s.generation == "g1" && s.ready
        })
        .await;
    assert_eq!(status.registries[0].state, RegistryState::Configured);
    assert_eq!(
        status.managed_files,
        vec!["/etc/docker/daemon.json".to_string()]
    );

    // dockerd reloaded: it lists the mirror without a restart.
    let want = format!("[\"{mirror}/\"]");
    wait_until(Duration::from_secs(20), Duration::from_millis(50), || {
        let now = dockerd.mirrors();
        let want = want.clone();
        async move { now == want }
    })
    .await
    .unwrap_or_else(|_| panic!("dockerd never listed the mirror: {}", dockerd.mirrors()));
    let merged: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&daemon_json).unwrap()).unwrap();
    assert_eq!(merged["log-level"], "warn", "the admin's keys stay");
    assert_eq!(merged["max-concurrent-downloads"], 2);

    // `docker pull demo:v1` is docker.io/library/demo:v1: served by the mirror.
    let pulled = docker(&dockerd.socket, &["pull", "demo:v1"]);
    assert!(
        pulled.status.success(),
        "docker pull failed: {}\n{}",
        String::from_utf8_lossy(&pulled.stderr),
        dockerd.child.log_tail()
    );
    // What dockerd pulled is in the mirror's cache: a HEAD is answered from it.
    let client = reqwest::Client::new();
    for blob in image.all_blobs() {
        let head = client
            .head(format!("{mirror}/v2/library/demo/blobs/{}", blob.digest))
            .send()
            .await
            .unwrap();
        assert_eq!(head.status(), 200, "{}", blob.digest);
        assert_eq!(
            head.headers()["x-cache"],
            "HIT",
            "{} came through the mirror",
            blob.digest
        );
    }
    let digests = docker(
        &dockerd.socket,
        &[
            "image",
            "inspect",
            "--format",
            "{{json .RepoDigests}}",
            "demo:v1",
        ],
    );
    assert!(
        String::from_utf8_lossy(&digests.stdout).contains(&image.manifest_digest),
        "{}",
        String::from_utf8_lossy(&digests.stdout)
    );

    // The mirror is removed: the agent takes the entry out and reloads dockerd again.
    node.write_desired(&docker_desired("g2", true));
    agent
        .wait("the entry taken out", |s| {
            s.generation == "g2" && s.managed_files.is_empty()
        })
        .await;
    wait_until(Duration::from_secs(20), Duration::from_millis(50), || {
        let now = dockerd.mirrors();
        async move { now == "[]" }
    })
    .await
    .unwrap_or_else(|_| panic!("dockerd kept the mirror: {}", dockerd.mirrors()));
    let restored: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&daemon_json).unwrap()).unwrap();
    let mut want_back: serde_json::Value = serde_json::from_str(admin).unwrap();
    want_back["registry-mirrors"] = serde_json::json!([]);
    assert_eq!(restored, want_back);
    let left: Vec<_> = std::fs::read_dir(&docker_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        left,
        vec!["daemon.json".to_string()],
        "nothing of ours left beside it"
    );

    agent.stop().await;
    dockerd.stop().await;
    let _ = stop_tx.send(());
    let _ = tokio::time::timeout(Duration::from_secs(15), serving).await;
}
