//! End to end: the real agent binary (`cachalot-operator node-agent`) writes into a temporary
//! certs.d, and a privately started real containerd pulls `docker.io/library/...` using exactly
//! those files.
//!
//! Cast (all on 127.0.0.1):
//! - `upstream`: a real distribution holding the images;
//! - `server`: a counting FaultProxy in front of it, used as the hosts.toml `server` (the desired
//!   state sets `server`, because the real `https://registry-1.docker.io` must never be reached);
//! - `mirror`: the real cachalot-registry (upstream `docker.io=<upstream>`) behind a counting
//!   FaultProxy that records `ns` (see [`Mirror`]);
//! - a private containerd (the testkit's) whose config carries the CRI registry `config_path`, so
//!   the agent's read-only check runs against a config containerd really started with.
//!
//! Phases: mirror configured → pull goes through the mirror with `ns=docker.io` and never to the
//! server; mirror removed from the desired state → its host entry is gone and the pull goes to the
//! server; `removing: true` → the file and its directory are gone, `managedFiles` is empty, and
//! containerd pulls directly from the server named by an administrator's `_default` file
//! (present, untouched, from the start: without any file containerd would go to the real
//! Docker Hub, which a test must never do);
//! SIGTERM → the agent exits cleanly.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use cachalot_operator::node_agent::protocol::{AgentStatus, DesiredState, Fallback, RegistryState};
use cachalot_testkit::containerd::{Containerd, ContainerdOptions, CtrOutput};
use cachalot_testkit::distribution::Distribution;
use cachalot_testkit::fault::FaultProxy;
use cachalot_testkit::image::{docker_image, push};
use cachalot_testkit::process::LoggedChild;
use cachalot_testkit::wait::{free_port, wait_for};
use common::node::{desired, AgentEndpoint, NodeDirs};
use common::spawn_registry;

const DEADLINE: Duration = Duration::from_secs(30);
const POLL: Duration = Duration::from_millis(100);

/// The desired state for docker.io through `endpoints` with `server` as the hosts.toml server.
fn desired_with_server(
    generation: &str,
    server: &str,
    endpoints: Vec<String>,
    removing: bool,
) -> DesiredState {
    let mut state = DesiredState {
        removing,
        unreachable_after: "2s".into(),
        ..desired(generation, endpoints)
    };
    state.registries[0].server = Some(server.to_string());
    state
}

/// The mirror: the real `cachalot-registry` (built next to the agent binary, or named by
/// `CACHALOT_E2E_REGISTRY`) behind a counting FaultProxy that records `ns`. Without the registry
/// binary the FaultProxy forwards straight to the upstream, standing in for it; the test prints
/// which one ran.
struct Mirror {
    front: FaultProxy,
    _registry: Option<LoggedChild>,
}

impl std::ops::Deref for Mirror {
    type Target = FaultProxy;
    fn deref(&self) -> &FaultProxy {
        &self.front
    }
}

impl Mirror {
    async fn start(dir: &Path, upstream_url: &str) -> Self {
        let binary = common::registry_binary_path();
        if !binary.exists() {
            eprintln!(
                "cachalot-registry not built ({}): FaultProxy stands in for the mirror",
                binary.display()
            );
            return Self {
                front: FaultProxy::start(upstream_url).await.unwrap(),
                _registry: None,
            };
        }
        let port = free_port().unwrap();
        let mut cmd = Command::new(&binary);
        cmd.arg("serve")
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            // Not read here: the admin listener takes any free port.
            .args(["--admin-listen", "127.0.0.1:0"])
            .arg("--storage")
            .arg(dir.join("registry-store"))
            .arg("--upstream")
            .arg(format!("docker.io={upstream_url}"));
        let url = format!("http://127.0.0.1:{port}");
        let registry = spawn_registry(
            &mut cmd,
            &dir.join("registry.log"),
            &format!("{url}/readyz"),
        )
        .await;
        eprintln!("mirror: real cachalot-registry {}", binary.display());
        Self {
            front: FaultProxy::start(&url).await.unwrap(),
            _registry: Some(registry),
        }
    }
}

/// The real agent binary (`cachalot-operator node-agent`), killed on drop.
struct AgentProcess {
    child: LoggedChild,
    endpoint: AgentEndpoint,
}

impl AgentProcess {
    /// Starts it writing into the node's certs.d and checking `containerd_config`.
    fn spawn(node: &NodeDirs, containerd_config: &Path) -> Self {
        let port = free_port().unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_cachalot-operator"));
        cmd.arg("node-agent")
            .arg("--desired-file")
            .arg(&node.desired_file)
            .arg("--certs-dir")
            .arg(&node.certs)
            .arg("--host-certs-dir")
            .arg(&node.certs)
            .arg("--containerd-config")
            .arg(containerd_config)
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--node-name")
            .arg("node-1")
            .arg("--interval")
            .arg("200ms")
            .env("RUST_LOG", "info");
        Self {
            child: LoggedChild::spawn(&mut cmd, &node.path().join("agent.log")).unwrap(),
            endpoint: AgentEndpoint::new(port),
        }
    }

    /// Polls its `/status` until `pred` holds; a failure shows the agent's log.
    async fn wait(&self, what: &str, pred: impl Fn(&AgentStatus) -> bool) -> AgentStatus {
        self.endpoint
            .wait_or_report(what, pred, || {
                format!("--- agent log ---\n{}", self.child.log_tail())
            })
            .await
    }
}

/// Requests of one pull, as counted by the two FaultProxies.
struct Served {
    mirror: u64,
    server: u64,
}

/// One node: `library/demo` in a real upstream, the `server` and the mirror in front of it, and
/// a private containerd whose hosts directory is the node's certs.d.
struct Rig {
    containerd: Containerd,
    server: FaultProxy,
    mirror: Mirror,
    _upstream: Distribution,
    // Last: the processes above may write into it until they are gone.
    node: NodeDirs,
}

impl Rig {
    /// Pushes `library/demo:TAG` for each `(tag, seed)`, with layers of `layer_sizes` bytes.
    async fn start(tags: &[(&str, u64)], layer_sizes: &[u64]) -> Self {
        let node = NodeDirs::new();
        let upstream = Distribution::start().await.unwrap();
        for &(tag, seed) in tags {
            let image = docker_image(seed, layer_sizes).unwrap();
            push(&upstream.url(), "library/demo", tag, &image)
                .await
                .unwrap();
        }
        let server = FaultProxy::start(&upstream.url()).await.unwrap();
        let mirror = Mirror::start(node.path(), &upstream.url()).await;
        let containerd = Containerd::start_with(ContainerdOptions {
            cri_registry_config_path: Some(node.certs.clone()),
            ..ContainerdOptions::default()
        })
        .await
        .unwrap();
        Self {
            containerd,
            server,
            mirror,
            _upstream: upstream,
            node,
        }
    }

    fn spawn_agent(&self) -> AgentProcess {
        AgentProcess::spawn(&self.node, &self.containerd.config_path())
    }

    /// Fetches all content of `reference` for this platform using the node's hosts files.
    async fn fetch(&self, reference: &str) -> CtrOutput {
        self.containerd
            .fetch(reference, &self.node.certs)
            .await
            .unwrap()
    }

    /// Fetches `reference` with fresh counts, checks that it succeeded, and says who served it.
    async fn fetch_counting(&self, reference: &str, what: &str) -> Served {
        self.server.handle().reset_counts();
        self.mirror.handle().reset_counts();
        let out = self.fetch(reference).await;
        assert!(
            out.success(),
            "{what} failed: {}\n{}",
            out.stderr,
            self.containerd.log_tail()
        );
        Served {
            mirror: self.mirror.handle().counts().total(),
            server: self.server.handle().counts().total(),
        }
    }

    /// How many of the mirror's requests carried `ns=docker.io`.
    fn mirror_requests_for_docker_io(&self) -> u64 {
        self.mirror
            .handle()
            .ns_seen()
            .get("docker.io")
            .copied()
            .unwrap_or(0)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_files_route_real_containerd_through_the_mirror_then_back_to_server_then_clean_up() {
    let rig = Rig::start(
        &[("v1", 11), ("v2", 12), ("v3", 13)],
        &[64 * 1024, 32 * 1024],
    )
    .await;
    let (node, server, mirror) = (&rig.node, &rig.server, &rig.mirror);
    let certs = &node.certs;
    // An administrator's catch-all: once our docker.io file is gone, containerd uses it, which
    // lets the test see a pull go "directly to server" without ever naming the real Docker Hub.
    let admin_default = format!(
        "server = \"{0}\"\n[host.\"{0}\"]\ncapabilities = [\"pull\", \"resolve\"]\n",
        server.url()
    );
    std::fs::create_dir(certs.join("_default")).unwrap();
    std::fs::write(certs.join("_default/hosts.toml"), &admin_default).unwrap();

    node.write_desired(&desired_with_server(
        "g1",
        &server.url(),
        vec![mirror.url()],
        false,
    ));
    let mut agent = rig.spawn_agent();

    // Phase 1: the mirror answers GET /v2/, passes the gate and is written.
    let s = agent
        .wait("mirror configured", |s| s.generation == "g1" && s.ready)
        .await;
    assert_eq!(s.registries[0].state, RegistryState::Configured);
    assert!(s.containerd.problems.is_empty(), "{:?}", s.containerd);
    assert_eq!(s.containerd.config_version, Some(2));
    let hosts_file = certs.join("docker.io/hosts.toml");
    assert_eq!(s.managed_files, [hosts_file.display().to_string()]);
    assert_eq!(agent.endpoint.get("/readyz").await.unwrap().0, 200);

    let served = rig
        .fetch_counting("docker.io/library/demo:v1", "pull through mirror")
        .await;
    assert!(
        rig.mirror_requests_for_docker_io() > 0,
        "mirror saw {:?}",
        mirror.handle().ns_seen()
    );
    assert!(
        served.mirror >= 3,
        "manifest, config and layers through the mirror"
    );
    assert_eq!(served.server, 0, "nothing may bypass a working mirror");

    // Phase 2: the mirror is removed from the desired state; the file falls back to `server`.
    node.write_desired(&desired_with_server("g2", &server.url(), vec![], false));
    agent.wait("mirror removed", |s| s.generation == "g2").await;
    let text = std::fs::read_to_string(&hosts_file).unwrap();
    assert!(!text.contains(&mirror.url()), "{text}");
    let served = rig
        .fetch_counting("docker.io/library/demo:v2", "direct pull")
        .await;
    assert_eq!(served.mirror, 0, "the removed mirror must not be used");
    assert!(served.server >= 3, "pull went to server");

    // Phase 3: the mirror is deleted; the agent removes its file and directory.
    node.write_desired(&desired_with_server("g3", &server.url(), vec![], true));
    let s = agent
        .wait("files removed", |s| {
            s.generation == "g3" && s.managed_files.is_empty()
        })
        .await;
    assert_eq!(s.registries[0].state, RegistryState::Removed);
    assert!(!certs.join("docker.io").exists());
    assert_eq!(
        std::fs::read_to_string(certs.join("_default/hosts.toml")).unwrap(),
        admin_default,
        "the administrator's file survives the whole lifecycle"
    );
    let served = rig
        .fetch_counting("docker.io/library/demo:v3", "pull after removal")
        .await;
    assert_eq!(served.mirror, 0, "no trace of the mirror after removal");
    assert!(served.server >= 3, "pull went directly to server");

    // SIGTERM stops the agent cleanly.
    let pid = agent.child.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let exited = wait_for(DEADLINE, POLL, || {
        let status = agent.child.try_wait().unwrap();
        async move { status }
    })
    .await;
    match exited {
        Ok(code) => assert!(
            code.success(),
            "agent exit {code:?}\n{}",
            agent.child.log_tail()
        ),
        Err(e) => panic!("agent did not stop on SIGTERM: {e}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fallback_never_keeps_containerd_off_the_upstream_even_when_the_mirror_is_down() {
    let rig = Rig::start(&[("v1", 31), ("v2", 32)], &[32 * 1024]).await;
    let (node, server, mirror) = (&rig.node, &rig.server, &rig.mirror);
    let mut state = desired_with_server("g1", &server.url(), vec![mirror.url()], false);
    state.registries[0].fallback = Fallback::Never;
    node.write_desired(&state);
    let agent = rig.spawn_agent();
    agent.wait("configured", |s| s.ready).await;

    let out = rig.fetch("docker.io/library/demo:v1").await;
    assert!(out.success(), "pull through mirror failed: {}", out.stderr);
    assert!(rig.mirror_requests_for_docker_io() > 0);

    mirror.handle().set_down(true);
    let s = agent
        .wait("unreachable reported", |s| {
            s.registries[0].state == RegistryState::Unreachable
        })
        .await;
    assert!(!s.ready);
    let text = std::fs::read_to_string(node.certs.join("docker.io/hosts.toml")).unwrap();
    assert!(
        text.contains(&mirror.url()),
        "Never keeps the mirror configured:\n{text}"
    );
    let out = rig.fetch("docker.io/library/demo:v2").await;
    assert!(
        !out.success(),
        "with the only mirror down and fallback Never the pull must fail"
    );
    assert_eq!(
        server.handle().counts().total(),
        0,
        "fallback Never must never reach the upstream"
    );
}
