//! Shared set-up of the registry's integration tests: a real distribution upstream behind the
//! counting/fault-injecting proxy, and a cachalot-registry served in-process on 127.0.0.1; the
//! S3 storage of a test's Garage.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use cachalot_registry::config::{Config, FreshnessRule, RegistryConfig};
use cachalot_registry::server::Server;
use cachalot_registry::telemetry::StatsSnapshot;
use cachalot_testkit::distribution::Distribution;
use cachalot_testkit::fault::{FaultHandle, FaultProxy};
use cachalot_testkit::image::{sha256_digest, TestImage};
use tokio::sync::oneshot;

pub const MIB: u64 = 1024 * 1024;

/// The tests' registry configuration: `docker.io` is `upstream_url`, the cache is `storage`, the
/// admin listener is on a port of the kernel's choosing, and failure paths are quick (short
/// timeouts).
fn test_config(listen: SocketAddr, storage: &Path, upstream_url: &str) -> Config {
    let mut config = Config {
        listen,
        admin_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        ..Config::default()
    };
    config.storage.path = storage.to_owned();
    config.registries.insert(
        "docker.io".into(),
        RegistryConfig {
            url: Some(upstream_url.to_owned()),
            ..RegistryConfig::default()
        },
    );
    config.upstream.connect_timeout = Duration::from_secs(2);
    config.upstream.response_timeout = Duration::from_secs(5);
    config.upstream.body_idle_timeout = Duration::from_secs(5);
    config
}

/// A cachalot-registry running in this process.
pub struct Cachalot {
    /// The public listener (the pull API).
    pub addr: SocketAddr,
    /// The admin listener (`/metrics`, `/stats`, `/admin/`).
    pub admin_addr: SocketAddr,
    pub storage: PathBuf,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Cachalot {
    /// Starts a registry whose `docker.io` is `upstream_url`, with `tweak` applied to the config.
    pub async fn start(
        storage: PathBuf,
        upstream_url: &str,
        tweak: impl FnOnce(&mut Config),
    ) -> Cachalot {
        let mut config = test_config("127.0.0.1:0".parse().unwrap(), &storage, upstream_url);
        tweak(&mut config);
        config.normalise();
        config.validate().unwrap();
        let server = Server::bind(&config).await.unwrap();
        let addr = server.local_addr().unwrap();
        let admin_addr = server.admin_addr().unwrap();
        let (tx, rx) = oneshot::channel();
        let task = tokio::spawn(server.run(async {
            let _ = rx.await;
        }));
        Cachalot {
            addr,
            admin_addr,
            storage,
            shutdown: Some(tx),
            task: Some(task),
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    /// Base URL of the admin listener.
    pub fn admin_url(&self) -> String {
        format!("http://{}", self.admin_addr)
    }

    /// `/stats`, from the admin listener.
    pub async fn stats(&self) -> StatsSnapshot {
        reqwest::get(format!("{}/stats", self.admin_url()))
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// `/metrics`, from the admin listener.
    pub async fn metrics(&self) -> String {
        reqwest::get(format!("{}/metrics", self.admin_url()))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// Stops the server and waits for it to finish.
    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(15), task)
                .await
                .expect("server stops within 15s")
                .unwrap();
        }
    }
}

impl Drop for Cachalot {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

/// A real distribution upstream behind a counting fault proxy, and a cachalot in front.
pub struct Rig {
    pub upstream: Distribution,
    pub fault: FaultProxy,
    pub cachalot: Cachalot,
    pub dir: tempfile::TempDir,
}

impl Rig {
    pub async fn start() -> Rig {
        Rig::start_with(|_| {}).await
    }

    pub async fn start_with(tweak: impl FnOnce(&mut Config)) -> Rig {
        let upstream = Distribution::start().await.unwrap();
        let fault = FaultProxy::start(&upstream.url()).await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        let cachalot = Cachalot::start(dir.path().join("cache"), &fault.url(), tweak).await;
        Rig {
            upstream,
            fault,
            cachalot,
            dir,
        }
    }

    /// Pushes a test image to the real upstream (behind the fault proxy's back).
    pub async fn push(&self, repo: &str, tag: &str, img: &cachalot_testkit::image::TestImage) {
        cachalot_testkit::image::push(&self.upstream.url(), repo, tag, img)
            .await
            .unwrap();
    }

    pub fn faults(&self) -> FaultHandle {
        self.fault.handle()
    }
}

/// A plain HTTP client for talking to cachalot directly.
/// Where the store keeps the sha256 blob `digest` (`sha256:<hex>`).
pub fn blob_file(storage: &Path, digest: &str) -> PathBuf {
    storage
        .join("blobs/sha256")
        .join(digest.strip_prefix("sha256:").unwrap())
}

/// Waits until every blob of `img` is committed to the store.
pub async fn committed(storage: &Path, img: &TestImage) {
    eventually(
        Duration::from_secs(10),
        "the image's blobs committed",
        || async {
            img.all_blobs()
                .iter()
                .all(|b| blob_file(storage, &b.digest).exists())
        },
    )
    .await;
}

/// Pulls `repo:1` and checks every digest and length; returns the `X-Cache` of each response.
pub async fn pull_verified(base: &str, repo: &str, img: &TestImage) -> Vec<String> {
    pull_tag_verified(base, repo, "1", img).await
}

/// Pulls `repo:tag`, expecting `img`, and checks every digest and length; returns the `X-Cache`
/// of each response.
pub async fn pull_tag_verified(base: &str, repo: &str, tag: &str, img: &TestImage) -> Vec<String> {
    let m = get_manifest(base, repo, tag).await;
    assert_eq!(m.status(), 200, "{repo}:{tag}");
    let mut caches = vec![m.headers()["x-cache"].to_str().unwrap().to_owned()];
    assert_eq!(
        sha256_digest(&m.bytes().await.unwrap()),
        img.manifest_digest
    );
    for blob in img.all_blobs() {
        let r = client()
            .get(format!("{base}/v2/{repo}/blobs/{}", blob.digest))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{repo} {}", blob.digest);
        caches.push(r.headers()["x-cache"].to_str().unwrap().to_owned());
        let body = r.bytes().await.unwrap();
        assert_eq!(body.len() as u64, blob.size);
        assert_eq!(sha256_digest(&body), blob.digest);
    }
    caches
}

/// A freshness rule trusting tags matching `pattern` for `max_age`.
pub fn fresh_for(pattern: &str, max_age: Duration) -> FreshnessRule {
    FreshnessRule {
        pattern: pattern.into(),
        repository: None,
        max_age: Some(max_age),
        immutable: false,
        not_found_max_age: None,
    }
}

/// Freshness that never revalidates a tag: upstream requests are then content fetches only.
pub fn tags_never_revalidate() -> Vec<FreshnessRule> {
    vec![FreshnessRule {
        pattern: "*".into(),
        repository: None,
        max_age: None,
        immutable: true,
        not_found_max_age: None,
    }]
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap()
}

/// GETs a URL with an `Accept` list for manifests.
pub async fn get_manifest(base: &str, repo: &str, reference: &str) -> reqwest::Response {
    client()
        .get(format!("{base}/v2/{repo}/manifests/{reference}"))
        .header("accept", cachalot_registry::oci::media::MANIFEST_ACCEPT)
        .send()
        .await
        .unwrap()
}

/// Polls `check` until it returns true, failing the test after `deadline`.
pub async fn eventually<F, Fut>(deadline: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = std::time::Instant::now();
    let mut delay = Duration::from_millis(5);
    loop {
        if check().await {
            return;
        }
        assert!(
            start.elapsed() < deadline,
            "timed out after {deadline:?} waiting for {what}"
        );
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_millis(200));
    }
}

/// The real `cachalot-registry` binary running as a child process (for tests that kill it).
pub struct Process {
    child: cachalot_testkit::process::LoggedChild,
    /// The public listener (the pull API).
    pub addr: SocketAddr,
    /// The admin listener (`/metrics`, `/stats`, `/admin/`).
    pub admin_addr: SocketAddr,
    pub storage: PathBuf,
    /// Holds the config file and the log; declared after `child` so the child is gone first.
    dir: tempfile::TempDir,
}

impl Process {
    /// Starts the binary on `storage` with `docker.io` at `upstream_url` and `tweak` applied to
    /// the config, and waits (bounded) until `/readyz` answers.
    pub async fn start(
        storage: &std::path::Path,
        upstream_url: &str,
        tweak: impl Fn(&mut Config),
    ) -> Process {
        // A port from the kernel may be taken again before the child binds it: retry.
        for attempt in 0..3 {
            let port = cachalot_testkit::wait::free_port().unwrap();
            let listen = SocketAddr::from(([127, 0, 0, 1], port));
            match Process::start_at(listen, storage, upstream_url, &tweak).await {
                Ok(process) => return process,
                Err(log) if attempt < 2 && log.contains("cannot listen") => {
                    eprintln!("port {port} taken; retrying");
                }
                Err(log) => panic!("cachalot-registry did not start:\n{log}"),
            }
        }
        unreachable!("the last attempt panics or returns")
    }

    /// Starts the binary listening on `listen` (for replicas that must know each other's
    /// addresses before they start); the log tail when it does not become ready.
    pub async fn start_at(
        listen: SocketAddr,
        storage: &std::path::Path,
        upstream_url: &str,
        tweak: impl Fn(&mut Config),
    ) -> Result<Process, String> {
        let dir = tempfile::Builder::new()
            .prefix("cachalot-proc")
            .tempdir()
            .unwrap();
        let mut config = test_config(listen, storage, upstream_url);
        config.admin_listen =
            SocketAddr::from(([127, 0, 0, 1], cachalot_testkit::wait::free_port().unwrap()));
        tweak(&mut config);
        // A tweak may place the admin listener (replicas sharing one admin port on their own
        // loopback addresses).
        let admin_addr = config.admin_listen;
        let config_path = dir.path().join("config.yaml");
        std::fs::write(&config_path, serde_yaml::to_string(&config).unwrap()).unwrap();
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_cachalot-registry"));
        command
            .args(["serve", "--config"])
            .arg(&config_path)
            .env("RUST_LOG", "info");
        let log = dir.path().join("registry.log");
        let mut child = cachalot_testkit::process::LoggedChild::spawn(&mut command, &log).unwrap();
        // The admin listener is plain HTTP whatever the public one speaks (TLS, a token).
        let url = format!("http://{admin_addr}/readyz");
        let probe = client();
        let ready = child
            .wait_ready(Duration::from_secs(20), Duration::from_millis(10), || {
                let request = probe.get(url.clone()).send();
                async move { request.await.is_ok_and(|r| r.status() == 200) }
            })
            .await;
        match ready {
            Ok(()) => Ok(Process {
                child,
                addr: listen,
                admin_addr,
                storage: storage.to_owned(),
                dir,
            }),
            Err(e) => Err(format!("{e}\n{}", child.log_tail())),
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn log_tail(&self) -> String {
        self.child.log_tail()
    }

    /// `/stats`, from the admin listener.
    pub async fn stats(&self) -> StatsSnapshot {
        reqwest::get(format!("http://{}/stats", self.admin_addr))
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// `kill -9`: no shutdown, no flush, no cleanup.
    pub fn kill(mut self) {
        self.child.kill().unwrap();
        drop(self.dir);
    }

    /// `kill -TERM` and a bounded wait for the graceful shutdown to finish.
    pub async fn terminate(mut self) {
        let status = std::process::Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        let child = &mut self.child;
        cachalot_testkit::wait::wait_until(
            Duration::from_secs(30),
            Duration::from_millis(20),
            || {
                let exited = child.try_wait().unwrap().is_some();
                async move { exited }
            },
        )
        .await
        .expect("cachalot-registry exits within 30s of SIGTERM");
    }
}

/// Every regular file under `root` (relative path → size), for comparing stores.
pub fn files_under(root: &std::path::Path) -> std::collections::BTreeMap<PathBuf, u64> {
    let mut out = std::collections::BTreeMap::new();
    let mut stack = vec![root.to_owned()];
    // Store trees are shallow (repository names have at most 128 components): bounded.
    let mut dirs_seen = 0;
    while let Some(dir) = stack.pop() {
        dirs_seen += 1;
        assert!(
            dirs_seen < 100_000,
            "walked too many directories under {root:?}"
        );
        for entry in std::fs::read_dir(&dir).unwrap().flatten() {
            let meta = entry.metadata().unwrap();
            if meta.is_dir() {
                stack.push(entry.path());
            } else {
                out.insert(
                    entry.path().strip_prefix(root).unwrap().to_owned(),
                    meta.len(),
                );
            }
        }
    }
    out
}

/// What one run of the `cachalot-registry` binary did.
pub struct CliRun {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `cachalot-registry ARGS...` (bounded to a minute).
pub async fn cli(args: &[&str]) -> CliRun {
    let output = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new(env!("CARGO_BIN_EXE_cachalot-registry"))
            .args(args)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("the command ends within a minute")
    .unwrap();
    CliRun {
        code: output.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// S3 storage in `garage`'s bucket under `prefix`, owned by `owner`, its keys written as files in
/// `keys_dir` (as the mounted Secret would be).
pub fn garage_s3(
    garage: &cachalot_testkit::s3::Garage,
    keys_dir: &Path,
    prefix: &str,
    owner: &str,
) -> cachalot_registry::config::S3Config {
    let (id, secret) = (keys_dir.join("key-id"), keys_dir.join("secret"));
    std::fs::write(&id, garage.access_key_id()).unwrap();
    std::fs::write(&secret, garage.secret_access_key()).unwrap();
    cachalot_registry::config::S3Config {
        endpoint: Some(garage.endpoint()),
        bucket: garage.bucket().to_owned(),
        region: Some(garage.region().to_owned()),
        prefix: prefix.into(),
        access_key_id_file: Some(id),
        secret_access_key_file: Some(secret),
        local_cache_max_size_bytes: None,
        eviction_grace: None,
        owner: owner.into(),
    }
}
