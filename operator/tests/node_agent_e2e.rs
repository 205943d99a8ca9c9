//! End to end: the real agent binary (`cachalot-operator node-agent`) writes into a temporary
//! certs.d, and a privately started real containerd pulls `docker.io/library/...` using exactly
//! those files.
//!
//! Cast (all on 127.0.0.1):
//! - `upstream`: a real distribution holding the images;
//! - `server`: a counting FaultProxy in front of it, used as the hosts.toml `server` (the desired
//!   state sets `server`, because the real `https://registry-1.docker.io` must never be reached);
//! - `mirror`: the real cachalot-registry (upstream `docker.io=<upstream>`) behind a counting
//!   FaultProxy that records `ns` (see [`Mirror`]).
//!
//! Phases: mirror configured → pull goes through the mirror with `ns=docker.io` and never to the
//! server; mirror removed from the desired state → its host entry is gone and the pull goes to the
//! server; `removing: true` → the file and its directory are gone, `managedFiles` is empty, and
//! containerd pulls directly from the server named by an administrator's `_default` file
//! (present, untouched, from the start: without any file containerd would go to the real
//! Docker Hub, which a test must never do);
//! SIGTERM → the agent exits cleanly.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use cachalot_operator::node_agent::protocol::{
    AgentStatus, DesiredRegistry, DesiredState, Fallback, RegistryState, Runtime,
};
use cachalot_testkit::client::http_client;
use cachalot_testkit::distribution::Distribution;
use cachalot_testkit::fault::FaultProxy;
use cachalot_testkit::image::{docker_image, push};
use cachalot_testkit::wait::{free_port, wait_for, wait_until};

const DEADLINE: Duration = Duration::from_secs(30);
const POLL: Duration = Duration::from_millis(100);

/// A child process killed (and reaped) on drop.
struct Proc {
    child: Child,
    name: &'static str,
    log: PathBuf,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proc {
    fn spawn(name: &'static str, mut cmd: Command, log: PathBuf) -> Self {
        let out = std::fs::File::create(&log).unwrap();
        let err = out.try_clone().unwrap();
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {name}: {e}"));
        Self { child, name, log }
    }
    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let tail = lines[lines.len().saturating_sub(40)..].join("\n");
        format!("--- {} log ---\n{tail}", self.name)
    }
}

/// A private containerd (no CRI, own root/state/socket) whose config also carries the CRI
/// registry `config_path`, so the agent's read-only check runs against a config containerd
/// really started with.
struct Containerd {
    proc: Proc,
    socket: PathBuf,
}

impl Containerd {
    async fn start(dir: &Path, certs_dir: &Path) -> Self {
        let root = dir.join("root");
        let state = dir.join("state");
        let socket = dir.join("c.sock");
        let config = dir.join("config.toml");
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(
            &config,
            format!(
                "version = 2\nroot = {root:?}\nstate = {state:?}\ndisabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\
                 [grpc]\n  address = {socket:?}\n\
                 [plugins.\"io.containerd.grpc.v1.cri\".registry]\n  config_path = {certs_dir:?}\n"
            ),
        )
        .unwrap();
        let mut cmd = Command::new("/usr/bin/containerd");
        cmd.arg("--config").arg(&config);
        let proc = Proc::spawn("containerd", cmd, dir.join("containerd.log"));
        let this = Self { proc, socket };
        let ready = wait_until(DEADLINE, POLL, || async {
            this.ctr(&["version"]).status.success()
        })
        .await;
        assert!(
            ready.is_ok(),
            "containerd did not start\n{}",
            this.proc.log_tail()
        );
        this
    }

    fn ctr(&self, args: &[&str]) -> std::process::Output {
        Command::new("/usr/bin/ctr")
            .arg("--address")
            .arg(&self.socket)
            .args(args)
            .output()
            .unwrap()
    }

    /// Fetches all content of `reference` for this platform using the given hosts directory.
    fn fetch(&self, certs_dir: &Path, reference: &str) -> std::process::Output {
        let hosts = certs_dir.to_str().unwrap();
        self.ctr(&[
            "-n",
            "test",
            "content",
            "fetch",
            "--hosts-dir",
            hosts,
            reference,
        ])
    }
}

fn desired(generation: &str, server: &str, endpoints: Vec<String>, removing: bool) -> DesiredState {
    DesiredState {
        mirror: "cachalot/hub".into(),
        generation: generation.into(),
        removing,
        runtime: Runtime::Containerd,
        registries: vec![DesiredRegistry {
            registry: "docker.io".into(),
            server: Some(server.to_string()),
            endpoints,
            fallback: Fallback::Upstream,
            dial_timeout: "1s".into(),
            skip_verify: false,
            ca_file: None,
            override_path: false,
        }],
        unreachable_after: "2s".into(),
        merge_with_admin_file: false,
    }
}

/// Writes the desired file the way a ConfigMap volume update appears: a new file swapped in.
fn write_desired(path: &Path, state: &DesiredState) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_vec(state).unwrap()).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

async fn status(client: &reqwest::Client, url: &str) -> Option<AgentStatus> {
    let response = client.get(format!("{url}/status")).send().await.ok()?;
    let bytes = response.bytes().await.ok()?;
    serde_json::from_slice(&bytes).ok()
}

async fn wait_status(
    client: &reqwest::Client,
    url: &str,
    agent: &Proc,
    what: &str,
    pred: impl Fn(&AgentStatus) -> bool,
) -> AgentStatus {
    let result = wait_for(DEADLINE, POLL, || async {
        status(client, url).await.filter(|s| pred(s))
    })
    .await;
    match result {
        Ok(s) => s,
        Err(e) => panic!(
            "{what}: {e}; last status {:?}\n{}",
            status(client, url).await,
            agent.log_tail()
        ),
    }
}

/// The mirror: the real `cachalot-registry` (built next to the agent binary, or named by
/// `CACHALOT_E2E_REGISTRY`) behind a counting FaultProxy that records `ns`. Without the registry
/// binary the FaultProxy forwards straight to the upstream, standing in for it; the test prints
/// which one ran.
struct Mirror {
    front: FaultProxy,
    _registry: Option<Proc>,
}

impl std::ops::Deref for Mirror {
    type Target = FaultProxy;
    fn deref(&self) -> &FaultProxy {
        &self.front
    }
}

impl Mirror {
    async fn start(dir: &Path, upstream_url: &str) -> Self {
        let binary = std::env::var_os("CACHALOT_E2E_REGISTRY")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                Path::new(env!("CARGO_BIN_EXE_cachalot-operator"))
                    .with_file_name("cachalot-registry")
            });
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
            .arg("--storage")
            .arg(dir.join("registry-store"))
            .arg("--upstream")
            .arg(format!("docker.io={upstream_url}"));
        let registry = Proc::spawn("cachalot-registry", cmd, dir.join("registry.log"));
        let url = format!("http://127.0.0.1:{port}");
        let client = http_client().unwrap();
        let ready = wait_until(DEADLINE, POLL, || {
            let request = client.get(format!("{url}/readyz"));
            async move { request.send().await.is_ok_and(|r| r.status().is_success()) }
        })
        .await;
        assert!(
            ready.is_ok(),
            "cachalot-registry did not become ready\n{}",
            registry.log_tail()
        );
        eprintln!("mirror: real cachalot-registry {}", binary.display());
        Self {
            front: FaultProxy::start(&url).await.unwrap(),
            _registry: Some(registry),
        }
    }
}

/// Starts the real agent binary on `port`, writing into `certs` and checking the private
/// containerd's config.
fn spawn_agent(dir: &Path, desired_file: &Path, certs: &Path, port: u16) -> Proc {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_cachalot-operator"));
    cmd.arg("node-agent")
        .arg("--desired-file")
        .arg(desired_file)
        .arg("--certs-dir")
        .arg(certs)
        .arg("--host-certs-dir")
        .arg(certs)
        .arg("--containerd-config")
        .arg(dir.join("containerd/config.toml"))
        .arg("--listen")
        .arg(format!("127.0.0.1:{port}"))
        .arg("--node-name")
        .arg("node-1")
        .arg("--interval")
        .arg("200ms")
        .env("RUST_LOG", "info");
    Proc::spawn("agent", cmd, dir.join("agent.log"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_files_route_real_containerd_through_the_mirror_then_back_to_server_then_clean_up() {
    let tmp = tempfile::tempdir().unwrap();
    let certs = tmp.path().join("certs.d");
    std::fs::create_dir(&certs).unwrap();
    let desired_file = tmp.path().join("desired.json");

    let upstream = Distribution::start().await.unwrap();
    for (tag, seed) in [("v1", 11), ("v2", 12), ("v3", 13)] {
        let image = docker_image(seed, &[64 * 1024, 32 * 1024]).unwrap();
        push(&upstream.url(), "library/demo", tag, &image)
            .await
            .unwrap();
    }
    let server = FaultProxy::start(&upstream.url()).await.unwrap();
    let mirror = Mirror::start(tmp.path(), &upstream.url()).await;
    let containerd = Containerd::start(&tmp.path().join("containerd"), &certs).await;
    // An administrator's catch-all: once our docker.io file is gone, containerd uses it, which
    // lets the test see a pull go "directly to server" without ever naming the real Docker Hub.
    let admin_default = format!(
        "server = \"{0}\"\n[host.\"{0}\"]\ncapabilities = [\"pull\", \"resolve\"]\n",
        server.url()
    );
    std::fs::create_dir(certs.join("_default")).unwrap();
    std::fs::write(certs.join("_default/hosts.toml"), &admin_default).unwrap();

    write_desired(
        &desired_file,
        &desired("g1", &server.url(), vec![mirror.url()], false),
    );
    let port = free_port().unwrap();
    let agent_url = format!("http://127.0.0.1:{port}");
    let mut agent = spawn_agent(tmp.path(), &desired_file, &certs, port);
    let client = http_client().unwrap();

    // Phase 1: the mirror answers GET /v2/, passes the gate and is written.
    let s = wait_status(&client, &agent_url, &agent, "mirror configured", |s| {
        s.generation == "g1" && s.ready
    })
    .await;
    assert_eq!(s.registries[0].state, RegistryState::Configured);
    assert!(s.containerd.problems.is_empty(), "{:?}", s.containerd);
    assert_eq!(s.containerd.config_version, Some(2));
    let hosts_file = certs.join("docker.io/hosts.toml");
    assert_eq!(s.managed_files, [hosts_file.display().to_string()]);
    let ready = client
        .get(format!("{agent_url}/readyz"))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 200);

    server.handle().reset_counts();
    mirror.handle().reset_counts();
    let out = containerd.fetch(&certs, "docker.io/library/demo:v1");
    assert!(
        out.status.success(),
        "pull through mirror failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        containerd.proc.log_tail()
    );
    assert!(
        mirror
            .handle()
            .ns_seen()
            .get("docker.io")
            .copied()
            .unwrap_or(0)
            > 0,
        "mirror saw {:?}",
        mirror.handle().ns_seen()
    );
    assert!(
        mirror.handle().counts().total() >= 3,
        "manifest, config and layers through the mirror"
    );
    assert_eq!(
        server.handle().counts().total(),
        0,
        "nothing may bypass a working mirror"
    );

    // Phase 2: the mirror is removed from the desired state; the file falls back to `server`.
    write_desired(&desired_file, &desired("g2", &server.url(), vec![], false));
    wait_status(&client, &agent_url, &agent, "mirror removed", |s| {
        s.generation == "g2"
    })
    .await;
    let text = std::fs::read_to_string(&hosts_file).unwrap();
    assert!(!text.contains(&mirror.url()), "{text}");
    mirror.handle().reset_counts();
    let out = containerd.fetch(&certs, "docker.io/library/demo:v2");
    assert!(
        out.status.success(),
        "direct pull failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        mirror.handle().counts().total(),
        0,
        "the removed mirror must not be used"
    );
    assert!(server.handle().counts().total() >= 3, "pull went to server");

    // Phase 3: the mirror is deleted; the agent removes its file and directory.
    write_desired(&desired_file, &desired("g3", &server.url(), vec![], true));
    let s = wait_status(&client, &agent_url, &agent, "files removed", |s| {
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
    server.handle().reset_counts();
    mirror.handle().reset_counts();
    let out = containerd.fetch(&certs, "docker.io/library/demo:v3");
    assert!(
        out.status.success(),
        "pull after removal failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        mirror.handle().counts().total(),
        0,
        "no trace of the mirror after removal"
    );
    assert!(
        server.handle().counts().total() >= 3,
        "pull went directly to server"
    );

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
        Ok(code) => assert!(code.success(), "agent exit {code:?}\n{}", agent.log_tail()),
        Err(e) => panic!("agent did not stop on SIGTERM: {e}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fallback_never_keeps_containerd_off_the_upstream_even_when_the_mirror_is_down() {
    let tmp = tempfile::tempdir().unwrap();
    let certs = tmp.path().join("certs.d");
    std::fs::create_dir(&certs).unwrap();
    let desired_file = tmp.path().join("desired.json");
    let upstream = Distribution::start().await.unwrap();
    for (tag, seed) in [("v1", 31), ("v2", 32)] {
        let image = docker_image(seed, &[32 * 1024]).unwrap();
        push(&upstream.url(), "library/demo", tag, &image)
            .await
            .unwrap();
    }
    let server = FaultProxy::start(&upstream.url()).await.unwrap();
    let mirror = Mirror::start(tmp.path(), &upstream.url()).await;
    let containerd = Containerd::start(&tmp.path().join("containerd"), &certs).await;
    let mut state = desired("g1", &server.url(), vec![mirror.url()], false);
    state.registries[0].fallback = Fallback::Never;
    write_desired(&desired_file, &state);
    let port = free_port().unwrap();
    let agent_url = format!("http://127.0.0.1:{port}");
    let agent = spawn_agent(tmp.path(), &desired_file, &certs, port);
    let client = http_client().unwrap();
    wait_status(&client, &agent_url, &agent, "configured", |s| s.ready).await;

    let out = containerd.fetch(&certs, "docker.io/library/demo:v1");
    assert!(
        out.status.success(),
        "pull through mirror failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        mirror
            .handle()
            .ns_seen()
            .get("docker.io")
            .copied()
            .unwrap_or(0)
            > 0
    );

    mirror.handle().set_down(true);
    let s = wait_status(&client, &agent_url, &agent, "unreachable reported", |s| {
        s.registries[0].state == RegistryState::Unreachable
    })
    .await;
    assert!(!s.ready);
    let text = std::fs::read_to_string(certs.join("docker.io/hosts.toml")).unwrap();
    assert!(
        text.contains(&mirror.url()),
        "Never keeps the mirror configured:\n{text}"
    );
    let out = containerd.fetch(&certs, "docker.io/library/demo:v2");
    assert!(
        !out.status.success(),
        "with the only mirror down and fallback Never the pull must fail"
    );
    assert_eq!(
        server.handle().counts().total(),
        0,
        "fallback Never must never reach the upstream"
    );
}
