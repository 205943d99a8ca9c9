//! The CRI-O `registries.conf.d` drop-in the agent writes, used by a real client of the same
//! family: Debian's podman pulls `docker.io/library/...` through the mirror listed in it, and
//! never contacts the registry's own location while the mirror works.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

use cachalot_operator::node_agent::apply::{execute, scan, Roots};
use cachalot_operator::node_agent::plan::reconcile_node;
use cachalot_operator::node_agent::protocol::{DesiredRegistry, DesiredState, Fallback, Runtime};
use cachalot_testkit::distribution::Distribution;
use cachalot_testkit::fault::FaultProxy;
use cachalot_testkit::image::{docker_image, push};

const PODMAN: &str = "/usr/bin/podman";

/// Pulls `reference` with podman using only `registries_conf`, in private storage.
fn podman_pull(dir: &Path, registries_conf: &Path, reference: &str) -> std::process::Output {
    Command::new(PODMAN)
        .env("CONTAINERS_REGISTRIES_CONF", registries_conf)
        .arg("--root")
        .arg(dir.join("root"))
        .arg("--runroot")
        .arg(dir.join("runroot"))
        .args([
            "--storage-driver",
            "vfs",
            "--events-backend",
            "none",
            "--cgroup-manager",
            "cgroupfs",
        ])
        .args(["pull", "--quiet", reference])
        .output()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn podman_pulls_docker_hub_images_through_the_mirror_in_the_agent_dropin() {
    assert!(
        Path::new(PODMAN).exists(),
        "podman is not installed: run scripts/install-test-deps"
    );
    let tmp = tempfile::tempdir().unwrap();
    let upstream = Distribution::start().await.unwrap();
    push(
        &upstream.url(),
        "library/demo",
        "v1",
        &docker_image(21, &[48 * 1024]).unwrap(),
    )
    .await
    .unwrap();
    let server = FaultProxy::start(&upstream.url()).await.unwrap();
    let mirror = FaultProxy::start(&upstream.url()).await.unwrap();

    let conf_dir = tmp.path().join("registries.conf.d");
    std::fs::create_dir(&conf_dir).unwrap();
    let roots = Roots {
        certs_dir: tmp.path().join("certs.d"),
        registries_conf_dir: Some(conf_dir.clone()),
    };
    let desired = DesiredState {
        mirror: "cachalot/hub".into(),
        generation: "g1".into(),
        removing: false,
        runtime: Runtime::Crio,
        registries: vec![DesiredRegistry {
            registry: "docker.io".into(),
            server: Some(server.url()),
            endpoints: vec![mirror.url()],
            fallback: Fallback::Upstream,
            dial_timeout: "1s".into(),
            skip_verify: false,
            ca_file: None,
            override_path: false,
        }],
        unreachable_after: "30s".into(),
        merge_with_admin_file: false,
    };
    let live: BTreeSet<String> = [mirror.url()].into();
    let plan = reconcile_node(&desired, &scan(&roots, &desired.mirror).unwrap(), &live);
    for action in &plan.actions {
        execute(&roots, action).unwrap();
    }
    let dropin = conf_dir.join("50-cachalot-cachalot-hub.conf");
    assert!(dropin.exists());

    let out = podman_pull(tmp.path(), &dropin, "docker.io/library/demo:v1");
    assert!(
        out.status.success(),
        "podman pull failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        std::fs::read_to_string(&dropin).unwrap()
    );
    let through_mirror = mirror.handle().counts().total();
    assert!(
        through_mirror >= 3,
        "manifest, config and layer through the mirror, saw {through_mirror}"
    );
    assert_eq!(
        server.handle().counts().total(),
        0,
        "the registry's own location must not be used"
    );
}
