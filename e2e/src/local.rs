//! The local target of the end-to-end suite: a real control plane on this machine
//! ([`cachalot_testkit::cluster`]) with fake nodes, a real distribution registry standing in for
//! Docker Hub, and the workspace's own binaries as the cachalot image.
//!
//! What differs from a kind or k3d cluster is only what [`Settings`] carries: the image the chart
//! installs exists on every node without a pull (like `kind load`), and the mirror's docker.io
//! upstream is the local distribution registry at an in-cluster address
//! ([`UPSTREAM_IN_CLUSTER`]) that the proxy stand-in pipes to the host's loopback. Between the two
//! sits the testkit's fault proxy acting as Docker Hub: HTTPS with a certificate from a test CA
//! (which the mirrors trust through a `caConfigMap`; docker.io must be reached over https),
//! bearer-token auth and `ratelimit-*` headers (a 100-pull window), so the mirror's budget is
//! real too. The suite's steps are the
//! same for both targets.
//!
//! Invariants: the upstream holds the images the suite pulls before the cluster starts; nothing
//! outside 127.0.0.1 and the cluster's own namespaces is contacted; everything started is
//! stopped when the [`LocalCluster`] drops.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::time::Duration;

use cachalot_testkit::cluster::pki::server_identity;
use cachalot_testkit::cluster::{self, tools, Cluster, ClusterOptions};
use cachalot_testkit::distribution::Distribution;
use cachalot_testkit::fault::{FaultProxy, FaultProxyOptions, RateLimit, TokenAuth};
use cachalot_testkit::image;

use crate::cluster::Settings;

/// The image reference the chart installs in the local target (present on every node).
pub const LOCAL_IMAGE: (&str, &str) = ("cachalot.test/cachalot", "e2e");
/// Where pods reach Docker Hub's stand-in (HTTPS, its own CA) from inside the cluster.
pub const UPSTREAM_IN_CLUSTER: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 250, 0, 10), 443);
/// The ConfigMap (key `ca.crt`) the suite creates in its namespaces with the upstream's CA.
pub const UPSTREAM_CA_CONFIG_MAP: &str = "upstream-ca";
/// The image the suite pulls through the mirror (generated, pushed to the local upstream).
pub const PULL_IMAGE: &str = "docker.io/library/alpine:3.19";
/// The image of helper pods that look at node files (generated too; its command runs with the
/// node's own binaries, see docs/testing.md).
pub const TOOLS_IMAGE: &str = "docker.io/library/busybox:1.36";

/// Why the local target cannot run.
#[derive(Debug, thiserror::Error)]
pub enum StartLocalError {
    /// A prerequisite (root, the control plane, a workspace binary, helm) is missing.
    #[error("{0}")]
    Unavailable(String),
    /// The upstream registry could not be started or filled.
    #[error("upstream registry: {0}")]
    Upstream(String),
    /// The image directory could not be made.
    #[error("image directory {path}: {source}")]
    ImageDir {
        /// The directory.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The cluster did not start.
    #[error(transparent)]
    Cluster(#[from] cluster::StartClusterError),
}

/// What the local target needs that may be missing; `None` when everything is there.
#[must_use]
pub fn unavailable_reason() -> Option<String> {
    if let Err(e) = cluster::netns::require_root() {
        return Some(e.to_string());
    }
    let checks = [
        tools::control_plane_bin().err(),
        tools::workspace_binary("cachalot-standin").err(),
        tools::workspace_binary("cachalot-registry").err(),
        tools::workspace_binary("cachalot-operator").err(),
        tools::helm().err(),
    ];
    checks.into_iter().flatten().next().map(|e| e.to_string())
}

/// The running local target. Fields drop in order: the cluster (and its pods) first.
#[derive(Debug)]
pub struct LocalCluster {
    /// The cluster.
    pub cluster: Cluster,
    /// Docker Hub's stand-in in front of the upstream: tokens, rate-limit headers, faults.
    pub hub: FaultProxy,
    /// The upstream registry.
    pub upstream: Distribution,
    /// The CA that signed the hub's certificate.
    pub upstream_ca_pem: String,
    image_dir: tempfile::TempDir,
}

/// Directory whose `cachalot-registry` and `cachalot-operator` are the workspace's binaries
/// (hard links when possible: a container's root filesystem cannot follow symlinks out of it).
fn build_image_dir(dir: &Path) -> Result<(), StartLocalError> {
    for binary in ["cachalot-registry", "cachalot-operator"] {
        let source = tools::workspace_binary(binary)
            .map_err(|e| StartLocalError::Unavailable(e.to_string()))?;
        let target = dir.join(binary);
        let image_dir = |source| StartLocalError::ImageDir {
            path: dir.to_owned(),
            source,
        };
        if std::fs::hard_link(&source, &target).is_err() {
            std::fs::copy(&source, &target).map_err(image_dir)?;
        }
    }
    Ok(())
}

impl LocalCluster {
    /// Starts the upstream with the suite's images, then a cluster with `nodes` fake nodes.
    ///
    /// # Errors
    /// [`StartLocalError`].
    pub async fn start(nodes: u8) -> Result<Self, StartLocalError> {
        if let Some(reason) = unavailable_reason() {
            return Err(StartLocalError::Unavailable(reason));
        }
        let upstream = Distribution::start()
            .await
            .map_err(|e| StartLocalError::Upstream(e.to_string()))?;
        for (seed, reference) in [(31, PULL_IMAGE), (32, TOOLS_IMAGE)] {
            let (repository, tag) = repository_and_tag(reference);
            let img = image::docker_image(seed, &[512 * 1024, 256 * 1024])
                .map_err(|e| StartLocalError::Upstream(e.to_string()))?;
            image::push(&upstream.url(), &repository, &tag, &img)
                .await
                .map_err(|e| StartLocalError::Upstream(e.to_string()))?;
        }
        let identity = server_identity("docker-hub-stand-in", &[*UPSTREAM_IN_CLUSTER.ip()])
            .map_err(|e| StartLocalError::Upstream(e.to_string()))?;
        let hub = FaultProxy::start_with(
            &upstream.url(),
            FaultProxyOptions {
                tls: Some((identity.cert_pem.clone(), identity.key_pem.clone())),
                public_url: Some(format!("https://{}", UPSTREAM_IN_CLUSTER.ip())),
            },
        )
        .await
        .map_err(|e| StartLocalError::Upstream(e.to_string()))?;
        hub.handle().enable_token_auth(TokenAuth::default());
        hub.handle().set_rate_limit(Some(RateLimit {
            limit: 100,
            retry_after_secs: 60,
        }));
        let image_dir = tempfile::Builder::new()
            .prefix("cachalot-image-")
            .tempdir()
            .map_err(|source| StartLocalError::ImageDir {
                path: std::env::temp_dir(),
                source,
            })?;
        build_image_dir(image_dir.path())?;
        let cluster = Cluster::start_with(ClusterOptions {
            nodes,
            images: vec![(
                format!("{}:{}", LOCAL_IMAGE.0, LOCAL_IMAGE.1),
                image_dir.path().to_owned(),
            )],
            externals: vec![(UPSTREAM_IN_CLUSTER, hub.addr())],
            ..ClusterOptions::default()
        })
        .await?;
        Ok(Self {
            cluster,
            hub,
            upstream,
            upstream_ca_pem: identity.ca_pem,
            image_dir,
        })
    }

    /// The suite's settings for this cluster.
    ///
    /// # Errors
    /// [`StartLocalError::Unavailable`] when helm is missing.
    pub fn settings(&self) -> Result<Settings, StartLocalError> {
        let helm = tools::helm().map_err(|e| StartLocalError::Unavailable(e.to_string()))?;
        Ok(Settings {
            kubeconfig: self.cluster.kubeconfig().to_owned(),
            helm: helm.display().to_string(),
            chart: crate::cluster::chart_dir(),
            release_namespace: "cachalot-system".to_owned(),
            image: Some((LOCAL_IMAGE.0.to_owned(), LOCAL_IMAGE.1.to_owned())),
            pull_image: PULL_IMAGE.to_owned(),
            tools_image: TOOLS_IMAGE.to_owned(),
            certs_dir: cluster::NODE_CERTS_DIR.to_owned(),
            containerd_config: None,
            upstream_url: Some(format!("https://{}", UPSTREAM_IN_CLUSTER.ip())),
            upstream_ca: Some((
                UPSTREAM_CA_CONFIG_MAP.to_owned(),
                self.upstream_ca_pem.clone(),
            )),
            timeout: Duration::from_secs(180),
        })
    }

    /// The directory the cachalot image's binaries are in.
    #[must_use]
    pub fn image_dir(&self) -> &Path {
        self.image_dir.path()
    }
}

/// `docker.io/library/alpine:3.19` → (`library/alpine`, `3.19`).
fn repository_and_tag(reference: &str) -> (String, String) {
    let without_host = reference
        .split_once('/')
        .map_or(reference, |(_, rest)| rest);
    let (repository, tag) = without_host
        .rsplit_once(':')
        .unwrap_or((without_host, "latest"));
    (repository.to_owned(), tag.to_owned())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    #[test]
    fn references_split_into_the_upstream_repository_and_tag() {
        assert_eq!(
            repository_and_tag("docker.io/library/alpine:3.19"),
            ("library/alpine".to_owned(), "3.19".to_owned())
        );
        assert_eq!(
            repository_and_tag("docker.io/library/busybox"),
            ("library/busybox".to_owned(), "latest".to_owned())
        );
    }
}
