//! Shared set-up of the registry's integration tests: a real distribution upstream behind the
//! counting/fault-injecting proxy, and a cachalot-registry served in-process on 127.0.0.1.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use cachalot_registry::config::{Config, RegistryConfig};
use cachalot_registry::server::Server;
use cachalot_registry::telemetry::StatsSnapshot;
use cachalot_testkit::distribution::Distribution;
use cachalot_testkit::fault::{FaultHandle, FaultProxy};
use tokio::sync::oneshot;

pub const MIB: u64 = 1024 * 1024;

/// A cachalot-registry running in this process.
pub struct Cachalot {
    pub addr: SocketAddr,
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
        let mut config = Config {
            listen: "127.0.0.1:0".parse().unwrap(),
            ..Config::default()
        };
        config.storage.path = storage.clone();
        config.registries.insert(
            "docker.io".into(),
            RegistryConfig {
                url: Some(upstream_url.to_owned()),
                ..RegistryConfig::default()
            },
        );
        // Tests exercise failure paths quickly: short timeouts, fast circuit.
        config.upstream.connect_timeout = Duration::from_secs(2);
        config.upstream.response_timeout = Duration::from_secs(5);
        config.upstream.body_idle_timeout = Duration::from_secs(5);
        tweak(&mut config);
        config.normalise();
        config.validate().unwrap();
        let server = Server::bind(&config).await.unwrap();
        let addr = server.local_addr().unwrap();
        let (tx, rx) = oneshot::channel();
        let task = tokio::spawn(server.run(async {
            let _ = rx.await;
        }));
        Cachalot {
            addr,
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

    pub async fn stats(&self) -> StatsSnapshot {
        reqwest::get(format!("{}/stats", self.url()))
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    pub async fn metrics(&self) -> String {
        reqwest::get(format!("{}/metrics", self.url()))
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
