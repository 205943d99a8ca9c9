//! Docker Engine through the mirror, with a real dockerd (Debian's docker.io, loopback only:
//! `--bridge=none --iptables=false`, private data and exec roots, its own socket and pid file)
//! and the real cachalot registry (in process) over a real distribution upstream:
//! the administrator's `daemon.json` is merged with the mirror entry ([`docker::merge`]),
//! dockerd reloads it on `SIGHUP` ([`docker::reload`]), `docker pull` of a Docker Hub image goes
//! through the mirror, and taking the entry out ([`docker::unmerge`]) plus a reload gives the
//! administrator's configuration back (with `"registry-mirrors": []`, which a reload needs).
//!
//! Proxy variables point at a closed local port, so if dockerd ever went past the mirror to
//! Docker Hub, the attempt would fail on this machine instead of leaving it.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use cachalot_operator::node_agent::docker::{self, Outcome};
use cachalot_registry::config::{Config, RegistryConfig};
use cachalot_registry::server::Server;
use cachalot_testkit::distribution::Distribution;
use cachalot_testkit::image::{docker_image, push};
use cachalot_testkit::process::LoggedChild;
use cachalot_testkit::wait::wait_until;

const DOCKERD: &str = "/usr/sbin/dockerd";
const DOCKER: &str = "/usr/bin/docker";

fn missing() -> Option<String> {
    if !Path::new(DOCKERD).exists() || !Path::new(DOCKER).exists() {
        return Some("dockerd is not installed: run scripts/install-test-deps".into());
    }
    if !rustix::process::geteuid().is_root() {
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
        let pid = rustix::process::Pid::from_raw(i32::try_from(self.child.id()).unwrap()).unwrap();
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
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

fn apply(path: &Path, outcome: Outcome) {
    match outcome {
        Outcome::Unchanged => {}
        Outcome::Write(text) => std::fs::write(path, text).unwrap(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dockerd_pulls_docker_hub_images_through_the_merged_mirror_and_gets_its_config_back() {
    if !cachalot_testkit::prerequisites::run_or_skip(
        "dockerd_pulls_docker_hub_images_through_the_merged_mirror_and_gets_its_config_back",
        missing(),
    ) {
        return;
    }
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
    let daemon_json = tmp.path().join("daemon.json");
    let admin = "{\n  \"log-level\": \"warn\",\n  \"max-concurrent-downloads\": 2\n}\n";
    std::fs::write(&daemon_json, admin).unwrap();
    let dockerd = Dockerd::start(tmp.path(), &daemon_json).await;
    assert_eq!(dockerd.mirrors(), "[]", "no mirror before the merge");

    // Merge and reload: dockerd picks the mirror up without a restart.
    apply(&daemon_json, docker::merge(Some(admin), &mirror).unwrap());
    docker::reload(&dockerd.pid_file).unwrap();
    let want = format!("[\"{mirror}/\"]");
    wait_until(Duration::from_secs(20), Duration::from_millis(50), || {
        let now = dockerd.mirrors();
        let want = want.clone();
        async move { now == want }
    })
    .await
    .unwrap_or_else(|_| panic!("dockerd never listed the mirror: {}", dockerd.mirrors()));

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

    // Take the entry out and reload: the administrator's configuration is back.
    let current = std::fs::read_to_string(&daemon_json).unwrap();
    apply(
        &daemon_json,
        docker::unmerge(Some(&current), &mirror).unwrap(),
    );
    let restored: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&daemon_json).unwrap()).unwrap();
    let mut want_back: serde_json::Value = serde_json::from_str(admin).unwrap();
    want_back["registry-mirrors"] = serde_json::json!([]);
    assert_eq!(restored, want_back);
    docker::reload(&dockerd.pid_file).unwrap();
    wait_until(Duration::from_secs(20), Duration::from_millis(50), || {
        let now = dockerd.mirrors();
        async move { now == "[]" }
    })
    .await
    .unwrap_or_else(|_| panic!("dockerd kept the mirror: {}", dockerd.mirrors()));

    dockerd.stop().await;
    let _ = stop_tx.send(());
    let _ = tokio::time::timeout(Duration::from_secs(15), serving).await;
}
