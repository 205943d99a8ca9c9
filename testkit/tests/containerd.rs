//! A private containerd pulls `docker.io/library/...` from the real distribution through
//! hosts.toml, directly as `server` or through a mirror host, and falls back when the mirror is down.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use cachalot_testkit::containerd::{write_hosts_toml, Containerd};
use cachalot_testkit::distribution::Distribution;
use cachalot_testkit::fault::{FaultProxy, Kind};
use cachalot_testkit::image::{self, docker_image, oci_index, TestImage};

const MIB: u64 = 1024 * 1024;

async fn seeded_upstream(repo: &str, tag: &str, image: &TestImage) -> Distribution {
    let upstream = Distribution::start().await.unwrap();
    image::push(&upstream.url(), repo, tag, image)
        .await
        .unwrap();
    upstream
}

/// A private containerd and a hosts directory whose docker.io has `server` and `mirrors`.
async fn containerd_with_hosts(server: &str, mirrors: &[&str]) -> (Containerd, tempfile::TempDir) {
    let containerd = Containerd::start().await.unwrap();
    let hosts = tempfile::tempdir().unwrap();
    write_hosts_toml(hosts.path(), "docker.io", server, mirrors).unwrap();
    (containerd, hosts)
}

#[tokio::test]
async fn containerd_pulls_a_docker_io_image_from_distribution_as_the_server() {
    let img = docker_image(21, &[MIB, 2 * MIB]).unwrap();
    let upstream = seeded_upstream("library/alpha", "1.0", &img).await;
    let (containerd, hosts) = containerd_with_hosts(&upstream.url(), &[]).await;

    let pull = containerd
        .pull("docker.io/library/alpha:1.0", hosts.path())
        .await
        .unwrap();
    assert!(pull.success(), "pull failed: {}", pull.stderr);
    assert!(containerd
        .images()
        .await
        .unwrap()
        .contains(&"docker.io/library/alpha:1.0".to_owned()));
    let content = containerd.content_digests().await.unwrap();
    for blob in img.all_blobs() {
        assert!(content.contains(&blob.digest), "missing {}", blob.digest);
    }
}

#[tokio::test]
async fn containerd_pulls_through_a_mirror_host_with_ns_docker_io_and_pulls_again_after_remove() {
    let img = docker_image(22, &[MIB]).unwrap();
    let upstream = seeded_upstream("library/beta", "2", &img).await;
    let proxy = FaultProxy::start(&upstream.url()).await.unwrap();
    // The server is a closed port: the pull can only succeed through the mirror.
    let closed = format!(
        "http://127.0.0.1:{}",
        cachalot_testkit::wait::free_port().unwrap()
    );
    let (containerd, hosts) = containerd_with_hosts(&closed, &[&proxy.url()]).await;

    let reference = "docker.io/library/beta:2";
    let pull = containerd.pull(reference, hosts.path()).await.unwrap();
    assert!(pull.success(), "pull failed: {}", pull.stderr);
    let requests = proxy.requests();
    assert!(!requests.is_empty());
    for request in &requests {
        assert_eq!(
            request.query.as_deref(),
            Some("ns=docker.io"),
            "{request:?}"
        );
        assert!(request.path.starts_with("/v2/library/beta/"), "{request:?}");
    }
    let first = proxy.counts();
    assert_eq!(
        first.get("GET", Kind::Blob),
        2,
        "config + 1 layer: {first:?}"
    );
    assert_eq!(
        first.kind_total(Kind::Base),
        0,
        "containerd does not call /v2/ first"
    );

    let pull = containerd
        .pull_again(reference, hosts.path())
        .await
        .unwrap();
    assert!(pull.success(), "second pull failed: {}", pull.stderr);
    assert_eq!(
        proxy.counts().get("GET", Kind::Blob),
        4,
        "rm --sync must drop the content"
    );
}

#[tokio::test]
async fn containerd_falls_back_to_the_server_when_the_mirror_is_down() {
    let img = docker_image(23, &[100_000]).unwrap();
    let upstream = seeded_upstream("library/gamma", "latest", &img).await;
    let proxy = FaultProxy::start(&upstream.url()).await.unwrap();
    proxy.set_down(true);
    let (containerd, hosts) = containerd_with_hosts(&upstream.url(), &[&proxy.url()]).await;

    let pull = containerd
        .pull("docker.io/library/gamma:latest", hosts.path())
        .await
        .unwrap();
    assert!(pull.success(), "pull failed: {}", pull.stderr);
    let dropped: u64 = proxy
        .counts()
        .entries
        .iter()
        .filter(|((_, _, status), _)| status.is_none())
        .map(|(_, n)| n)
        .sum();
    let served: u64 = proxy.counts().total() - dropped;
    assert_eq!(served, 0, "a down mirror must not serve anything");
}

#[tokio::test]
async fn containerd_fetches_only_the_host_platform_of_an_oci_index() {
    let index = oci_index(24, &[200_000]).unwrap();
    let upstream = seeded_upstream("library/multi", "1", &index).await;
    let proxy = FaultProxy::start(&upstream.url()).await.unwrap();
    let (containerd, hosts) = containerd_with_hosts(&upstream.url(), &[&proxy.url()]).await;

    let fetch = containerd
        .fetch("docker.io/library/multi:1", hosts.path())
        .await
        .unwrap();
    assert!(fetch.success(), "fetch failed: {}", fetch.stderr);
    let content = containerd.content_digests().await.unwrap();
    let amd64 = index.child_for("amd64").unwrap();
    let arm64 = index.child_for("arm64").unwrap();
    assert!(content.contains(&index.manifest_digest));
    assert!(content.contains(&amd64.manifest_digest));
    assert!(content.contains(&amd64.layers()[0].digest));
    assert!(
        !content.contains(&arm64.layers()[0].digest),
        "arm64 layer fetched on amd64"
    );
}

#[tokio::test]
async fn a_pull_of_a_missing_image_fails_with_a_non_zero_status() {
    let upstream = Distribution::start().await.unwrap();
    let (containerd, hosts) = containerd_with_hosts(&upstream.url(), &[]).await;
    let pull = containerd
        .pull("docker.io/library/absent:1", hosts.path())
        .await
        .unwrap();
    assert!(!pull.success());
    assert!(pull.clone().into_success().is_err());
    assert!(pull.stderr.contains("not found"), "{}", pull.stderr);
    assert!(
        !pull.stderr.contains("registry-1.docker.io"),
        "containerd left the hosts.toml hosts: {}",
        pull.stderr
    );
}
