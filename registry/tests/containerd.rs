//! A real containerd pulls `docker.io/library/...` through cachalot using a hosts.toml mirror
//! entry, exactly as a node configured by the node agent does; with cachalot stopped it falls back
//! to `server`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use cachalot_testkit::containerd::{write_hosts_toml, Containerd};
use cachalot_testkit::fault::{FaultProxy, Kind};
use cachalot_testkit::image::{docker_image, oci_index};
use common::{Rig, MIB};

#[tokio::test]
async fn containerd_pulls_through_cachalot_with_ns_docker_io_and_falls_back_when_it_stops() {
    let rig = Rig::start().await;
    let img = docker_image(501, &[MIB, 2 * MIB]).unwrap();
    rig.push("library/web", "stable", &img).await;
    let index = oci_index(502, &[MIB]).unwrap();
    rig.push("library/multi", "1", &index).await;
    // A recorder in front of cachalot shows what containerd sends to the mirror.
    let recorder = FaultProxy::start(&rig.cachalot.url()).await.unwrap();
    let containerd = Containerd::start().await.unwrap();
    let hosts = tempfile::tempdir().unwrap();
    // `server` is the upstream itself (what `https://registry-1.docker.io` is on a real node).
    write_hosts_toml(
        hosts.path(),
        "docker.io",
        &rig.upstream.url(),
        &[&recorder.url()],
    )
    .unwrap();
    rig.faults().reset_counts();

    let reference = "docker.io/library/web:stable";
    let pull = containerd.pull(reference, hosts.path()).await.unwrap();
    assert!(
        pull.success(),
        "pull through cachalot failed: {}",
        pull.stderr
    );
    let ns = recorder.handle().ns_seen();
    assert_eq!(ns.keys().collect::<Vec<_>>(), vec!["docker.io"], "{ns:?}");
    let stats = rig.cachalot.stats().await;
    assert!(stats.registries["docker.io"].misses >= 3, "{stats:?}");
    assert_eq!(stats.errors, 0, "{stats:?}");
    let upstream_after_first = rig.faults().counts();
    assert_eq!(
        upstream_after_first.get("GET", Kind::Blob),
        3,
        "config + 2 layers"
    );

    // Pull again after removing the image: everything comes from the cache.
    let pull = containerd
        .pull_again(reference, hosts.path())
        .await
        .unwrap();
    assert!(pull.success(), "second pull failed: {}", pull.stderr);
    let upstream_after_second = rig.faults().counts();
    assert_eq!(
        upstream_after_second.get("GET", Kind::Blob),
        3,
        "no blob fetched twice"
    );
    assert!(rig.cachalot.stats().await.hits >= 3);

    // An index: containerd resolves the tag and fetches only its own platform's child.
    let pull = containerd
        .pull("docker.io/library/multi:1", hosts.path())
        .await
        .unwrap();
    assert!(pull.success(), "index pull failed: {}", pull.stderr);

    // Mirror gone: containerd falls back to `server` and the pull still works.
    containerd
        .remove(reference)
        .await
        .unwrap()
        .into_success()
        .unwrap();
    let Rig {
        cachalot,
        upstream,
        fault,
        dir,
    } = rig;
    cachalot.stop().await;
    let direct = FaultProxy::start(&upstream.url()).await.unwrap();
    write_hosts_toml(hosts.path(), "docker.io", &direct.url(), &[&recorder.url()]).unwrap();
    let pull = containerd.pull(reference, hosts.path()).await.unwrap();
    assert!(pull.success(), "fallback pull failed: {}", pull.stderr);
    assert!(
        direct.handle().counts().get("GET", Kind::Blob) >= 1,
        "fallback went to server"
    );
    drop((fault, dir));
}
