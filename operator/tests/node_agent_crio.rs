//! The CRI-O `registries.conf.d` drop-in the agent writes, used by a real client of the same
//! family: Debian's podman (the containers/image library CRI-O uses) pulls images of two
//! registries through the real `cachalot-registry`, each addressed by its path prefix, and never
//! contacts a registry's own location while the mirror works. Then the agent's reload of CRI-O
//! (SIGHUP to the pid in `--crio-pid-file`) against a stand-in process: there is no CRI-O binary
//! here, so a shell that counts the SIGHUPs it gets plays its part.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use cachalot_operator::node_agent::apply::{execute, scan, Roots};
use cachalot_operator::node_agent::plan::reconcile_node;
use cachalot_operator::node_agent::protocol::{
    DesiredRegistry, DesiredState, Fallback, Reason, Runtime,
};
use cachalot_operator::node_agent::Args;
use cachalot_testkit::distribution::Distribution;
use cachalot_testkit::fault::FaultProxy;
use cachalot_testkit::image::{docker_image, push};
use cachalot_testkit::process::LoggedChild;
use cachalot_testkit::wait::{free_port, wait_for};
use common::node::{agent_args, desired, NodeDirs, RunningAgent};
use common::{admin_stats, spawn_registry};

const PODMAN: &str = "/usr/bin/podman";
const DEADLINE: Duration = Duration::from_secs(30);
const POLL: Duration = Duration::from_millis(50);

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

/// The real `cachalot-registry` (built next to the operator binary, or named by
/// `CACHALOT_E2E_REGISTRY`) serving `registries` (`name=url`), killed on drop; with its public
/// and admin URLs.
async fn start_registry(
    dir: &Path,
    registries: &[(&str, String)],
) -> (LoggedChild, String, String) {
    let binary = common::registry_binary();
    let port = free_port().unwrap();
    let admin_port = free_port().unwrap();
    let mut cmd = Command::new(&binary);
    cmd.arg("serve")
        .arg("--listen")
        .arg(format!("127.0.0.1:{port}"))
        .arg("--admin-listen")
        .arg(format!("127.0.0.1:{admin_port}"))
        .arg("--storage")
        .arg(dir.join("registry-store"));
    for (name, url) in registries {
        cmd.arg("--upstream").arg(format!("{name}={url}"));
    }
    let url = format!("http://127.0.0.1:{port}");
    let child = spawn_registry(
        &mut cmd,
        &dir.join("registry.log"),
        &format!("{url}/readyz"),
    )
    .await;
    (child, url, format!("http://127.0.0.1:{admin_port}"))
}

fn crio_registry(name: &str, server: String, endpoint: String) -> DesiredRegistry {
    DesiredRegistry {
        registry: name.into(),
        server: Some(server),
        endpoints: vec![endpoint],
        fallback: Fallback::Upstream,
        dial_timeout: "1s".into(),
        skip_verify: false,
        ca_file: None,
        override_path: false,
        client_cert: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn podman_pulls_two_registries_through_the_real_registry_by_the_agents_path_prefixes() {
    assert!(
        Path::new(PODMAN).exists(),
        "podman is not installed: run scripts/install-test-deps"
    );
    let tmp = tempfile::tempdir().unwrap();
    let hub = Distribution::start().await.unwrap();
    let ghcr = Distribution::start().await.unwrap();
    push(
        &hub.url(),
        "library/demo",
        "v1",
        &docker_image(21, &[48 * 1024]).unwrap(),
    )
    .await
    .unwrap();
    push(
        &ghcr.url(),
        "org/app",
        "v1",
        &docker_image(22, &[32 * 1024]).unwrap(),
    )
    .await
    .unwrap();
    // What cachalot fetches from, counted per registry.
    let hub_upstream = FaultProxy::start(&hub.url()).await.unwrap();
    let ghcr_upstream = FaultProxy::start(&ghcr.url()).await.unwrap();
    // The registries' own locations in the drop-in: never to be used while the mirror works.
    let hub_server = FaultProxy::start(&hub.url()).await.unwrap();
    let ghcr_server = FaultProxy::start(&ghcr.url()).await.unwrap();
    let (_registry, registry_url, registry_admin) = start_registry(
        tmp.path(),
        &[
            ("docker.io", hub_upstream.url()),
            ("ghcr.io", ghcr_upstream.url()),
        ],
    )
    .await;

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
        registries: vec![
            crio_registry("docker.io", hub_server.url(), registry_url.clone()),
            crio_registry("ghcr.io", ghcr_server.url(), registry_url.clone()),
        ],
        unreachable_after: "30s".into(),
        merge_with_admin_file: false,
        mirror_ca_file: None,
        mirror_client_cert: None,
    };
    let live: BTreeSet<String> = [registry_url.clone()].into();
    let plan = reconcile_node(&desired, &scan(&roots, &desired.mirror).unwrap(), &live);
    for action in &plan.actions {
        execute(&roots, action).unwrap();
    }
    let dropin = conf_dir.join("50-cachalot-cachalot-hub.conf");
    let text = std::fs::read_to_string(&dropin).unwrap();
    let host = registry_url.trim_start_matches("http://");
    assert!(
        text.contains(&format!("location = \"{host}/ghcr.io\"")),
        "{text}"
    );

    for reference in ["docker.io/library/demo:v1", "ghcr.io/org/app:v1"] {
        let out = podman_pull(tmp.path(), &dropin, reference);
        assert!(
            out.status.success(),
            "podman pull {reference} failed: {}\n{text}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // Each registry's content came from its own upstream, through cachalot.
    for (name, upstream) in [("docker.io", &hub_upstream), ("ghcr.io", &ghcr_upstream)] {
        let fetched = upstream.handle().counts().total();
        assert!(
            fetched >= 3,
            "{name}: manifest, config and layer from its upstream, saw {fetched}"
        );
    }
    let stats = admin_stats(&registry_admin).await;
    for name in ["docker.io", "ghcr.io"] {
        assert!(
            stats["registries"][name]["misses"].as_u64().unwrap() >= 3,
            "{name}: {stats}"
        );
    }
    assert_eq!(stats["errors"], 0, "{stats}");
    assert_eq!(
        hub_server.handle().counts().total() + ghcr_server.handle().counts().total(),
        0,
        "a registry's own location must not be used"
    );
}

/// A stand-in for CRI-O: a shell that appends a line to `log` on every SIGHUP, killed on drop.
struct StandIn {
    child: std::process::Child,
    log: PathBuf,
}

impl StandIn {
    fn start(dir: &Path) -> Self {
        let log = dir.join("hups");
        std::fs::write(&log, "").unwrap();
        let ready = dir.join("standin-ready");
        // `wait` returns as soon as a trapped signal arrives; each pass is bounded by `sleep 1`.
        let script = format!(
            "trap 'echo hup >> {log}' HUP; touch {ready}; while :; do sleep 1 & wait $!; done",
            log = log.display(),
            ready = ready.display()
        );
        // No inherited pipes: the `sleep` left behind when the shell is killed must not hold the
        // test's output open.
        let child = Command::new("/bin/sh")
            .args(["-c", &script])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let standin = Self { child, log };
        let start = std::time::Instant::now();
        while !ready.exists() {
            assert!(start.elapsed() < DEADLINE, "stand-in did not start");
            std::thread::yield_now();
        }
        standin
    }

    fn hups(&self) -> usize {
        std::fs::read_to_string(&self.log).unwrap().lines().count()
    }
}

impl Drop for StandIn {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_dropin_is_followed_by_one_sighup_to_the_pid_in_the_pid_file() {
    let node = NodeDirs::new();
    let conf_dir = node.path().join("registries.conf.d");
    std::fs::create_dir(&conf_dir).unwrap();
    let pid_file = node.path().join("crio.pid");
    let upstream = Distribution::start().await.unwrap();
    let mirror_a = FaultProxy::start(&upstream.url()).await.unwrap();
    let mirror_b = FaultProxy::start(&upstream.url()).await.unwrap();
    let crio_desired = |generation: &str, endpoint: String| DesiredState {
        runtime: Runtime::Crio,
        ..desired(generation, vec![endpoint])
    };
    node.write_desired(&crio_desired("g1", mirror_a.url()));

    let agent = RunningAgent::spawn(Args {
        registries_conf_dir: Some(conf_dir.clone()),
        crio_pid_file: Some(pid_file.clone()),
        ..agent_args(&node, free_port().unwrap())
    });
    let dropin = conf_dir.join("50-cachalot-cachalot-hub.conf");

    // No pid file yet: the drop-in is written, CRI-O cannot be told, the node says why.
    let s = agent
        .wait("reload failure reported", |s| {
            s.problems
                .iter()
                .any(|p| p.reason == Reason::RuntimeReloadFailed)
        })
        .await;
    assert!(!s.ready);
    assert!(dropin.exists());
    let message = &s.problems[0].message;
    assert!(message.contains("crio.pid"), "{message}");

    // The pid file appears: one SIGHUP, the problem clears.
    let crio = StandIn::start(node.path());
    std::fs::write(&pid_file, format!("{}\n", crio.child.id())).unwrap();
    agent.wait("reloaded and ready", |s| s.ready).await;
    assert_eq!(crio.hups(), 1);

    // A changed drop-in is signalled once more; rounds that change nothing send nothing.
    node.write_desired(&crio_desired("g2", mirror_b.url()));
    agent
        .wait("second drop-in applied", |s| {
            s.generation == "g2" && s.ready
        })
        .await;
    let text = std::fs::read_to_string(&dropin).unwrap();
    assert!(text.contains(mirror_b.url().trim_start_matches("http://")));
    wait_for(DEADLINE, POLL, || async {
        (crio.hups() == 2).then_some(())
    })
    .await
    .unwrap();
    // Every round probes the mirror: three more probes are three more rounds without a change.
    let probes = mirror_b.handle().counts().total();
    wait_for(DEADLINE, POLL, || async {
        (mirror_b.handle().counts().total() >= probes + 3).then_some(())
    })
    .await
    .unwrap();
    assert_eq!(crio.hups(), 2, "no SIGHUP without a change");

    agent.stop().await;
}
