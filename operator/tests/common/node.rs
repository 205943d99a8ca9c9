//! One node as the node agent sees it, for the agent's loop tests: a temp dir with an empty
//! `certs.d` and the desired-state file the agent follows, desired states, and the agent's HTTP
//! endpoint polled (with a deadline) until its `/status` says what a test waits for; the agent
//! loop itself run in this process ([`RunningAgent`]).

use std::path::{Path, PathBuf};
use std::time::Duration;

use cachalot_operator::node_agent::protocol::{
    AgentStatus, DesiredRegistry, DesiredState, Fallback, Runtime,
};
use cachalot_testkit::client::http_client;
use cachalot_testkit::wait::wait_for;

/// Bound of every wait for an agent's status.
const DEADLINE: Duration = Duration::from_secs(30);
const POLL: Duration = Duration::from_millis(50);

/// The agent loop (library `run_until`) running in this process, answering on its
/// [`AgentEndpoint`] (which it derefs to).
pub struct RunningAgent {
    pub endpoint: AgentEndpoint,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), cachalot_operator::node_agent::RunError>>,
}

impl std::ops::Deref for RunningAgent {
    type Target = AgentEndpoint;
    fn deref(&self) -> &AgentEndpoint {
        &self.endpoint
    }
}

impl RunningAgent {
    /// Starts the loop with `args`; its endpoint is `args.listen`'s port on 127.0.0.1.
    pub fn spawn(args: cachalot_operator::node_agent::Args) -> Self {
        let port = args.listen.port();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(cachalot_operator::node_agent::run_until(args, async move {
            let _ = rx.await;
        }));
        Self {
            endpoint: AgentEndpoint::new(port),
            stop: Some(tx),
            task,
        }
    }

    /// Asks the loop to stop and fails unless it ends, cleanly, within the deadline.
    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        let result = tokio::time::timeout(DEADLINE, self.task)
            .await
            .expect("agent stops in time");
        result.unwrap().unwrap();
    }
}

/// A node's directories, removed on drop.
pub struct NodeDirs {
    tmp: tempfile::TempDir,
    /// The (empty at first) hosts directory the agent writes into.
    pub certs: PathBuf,
    /// Where the agent reads its desired state (not written yet).
    pub desired_file: PathBuf,
}

impl NodeDirs {
    pub fn new() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let certs = tmp.path().join("certs.d");
        std::fs::create_dir(&certs).unwrap();
        let desired_file = tmp.path().join("desired.json");
        Self {
            tmp,
            certs,
            desired_file,
        }
    }

    /// The temp dir, for anything else a test keeps there.
    pub fn path(&self) -> &Path {
        self.tmp.path()
    }

    /// Writes the desired state.
    pub fn write_desired(&self, state: &DesiredState) {
        self.write_desired_bytes(&serde_json::to_vec(state).unwrap());
    }

    /// Writes the desired file the way a ConfigMap volume update appears: a new file swapped in.
    pub fn write_desired_bytes(&self, bytes: &[u8]) {
        let tmp = self.desired_file.with_extension("tmp");
        std::fs::write(&tmp, bytes).unwrap();
        std::fs::rename(&tmp, &self.desired_file).unwrap();
    }
}

/// The agent's command line for `node`, answering on 127.0.0.1:`port`, with quick rounds
/// (100 ms) and probes (500 ms), and no runtime beyond the certs.d directory; tests set the rest
/// with struct update syntax.
pub fn agent_args(node: &NodeDirs, port: u16) -> cachalot_operator::node_agent::Args {
    cachalot_operator::node_agent::Args {
        desired_file: node.desired_file.clone(),
        certs_dir: node.certs.clone(),
        containerd_config: None,
        host_certs_dir: None,
        host_containerd_config: None,
        registries_conf_dir: None,
        crio_pid_file: None,
        docker_config: None,
        host_docker_config: None,
        docker_pid_file: None,
        listen: std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        node_name: "node-1".into(),
        interval: Duration::from_millis(100),
        probe_timeout: Duration::from_millis(500),
        log_format: cachalot_operator::telemetry::LogFormat::Text,
    }
}

/// The desired state of mirror `cachalot/hub` for docker.io through `endpoints`: no `server`,
/// fallback to the upstream, a 1 s dial timeout, a mirror taken out after 1 s unreachable.
pub fn desired(generation: &str, endpoints: Vec<String>) -> DesiredState {
    DesiredState {
        mirror: "cachalot/hub".into(),
        generation: generation.into(),
        removing: false,
        runtime: Runtime::Containerd,
        registries: vec![DesiredRegistry {
            registry: "docker.io".into(),
            server: None,
            endpoints,
            fallback: Fallback::Upstream,
            dial_timeout: "1s".into(),
            skip_verify: false,
            ca_file: None,
            override_path: false,
            client_cert: None,
        }],
        unreachable_after: "1s".into(),
        merge_with_admin_file: false,
        mirror_ca_file: None,
        mirror_client_cert: None,
    }
}

/// An agent's HTTP endpoint on 127.0.0.1.
pub struct AgentEndpoint {
    pub url: String,
    client: reqwest::Client,
}

impl AgentEndpoint {
    pub fn new(port: u16) -> Self {
        Self {
            url: format!("http://127.0.0.1:{port}"),
            client: http_client().unwrap(),
        }
    }

    /// `GET path`: the status code and body, `None` when the agent does not answer.
    pub async fn get(&self, path: &str) -> Option<(u16, Vec<u8>)> {
        let r = self
            .client
            .get(format!("{}{path}", self.url))
            .send()
            .await
            .ok()?;
        let status = r.status().as_u16();
        Some((status, r.bytes().await.ok()?.to_vec()))
    }

    /// Its `/status`, `None` when it does not answer or does not parse.
    pub async fn status(&self) -> Option<AgentStatus> {
        let (_, body) = self.get("/status").await?;
        serde_json::from_slice(&body).ok()
    }

    /// Polls `/status` until `pred` holds, and fails naming `what` and the last status.
    pub async fn wait(&self, what: &str, pred: impl Fn(&AgentStatus) -> bool) -> AgentStatus {
        self.wait_or_report(what, pred, String::new).await
    }

    /// As [`Self::wait`], adding `report()` (e.g. the agent's log) to the failure.
    pub async fn wait_or_report(
        &self,
        what: &str,
        pred: impl Fn(&AgentStatus) -> bool,
        report: impl FnOnce() -> String,
    ) -> AgentStatus {
        match wait_for(DEADLINE, POLL, || async {
            self.status().await.filter(|s| pred(s))
        })
        .await
        {
            Ok(s) => s,
            Err(e) => panic!(
                "{what}: {e}; last status {:?}\n{}",
                self.status().await,
                report()
            ),
        }
    }
}
