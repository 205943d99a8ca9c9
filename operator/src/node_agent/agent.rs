//! The agent process: command line, the reconcile loop and the status HTTP server.
//!
//! Each round (every `--interval`, level-triggered): read the desired-state file (polled by
//! content, because ConfigMap volume updates swap a symlink and inotify on the file is
//! unreliable), read the mirror's CA when the desired state names one (`mirrorCaFile`, a mounted
//! Secret key, also polled by content) and the node's client certificate (`mirrorClientCert`),
//! probe the desired endpoints (`GET /v2/`, bounded timeouts, trusting that CA and presenting
//! that certificate, as containerd will), update the gate, scan
//! the directories, plan ([`super::plan::reconcile_node`], pure), execute, check containerd's
//! config read-only, publish [`AgentStatus`].
//!
//! Invariants: the agent never exits on bad input (it reports it); SIGTERM stops it without
//! touching node files (a rolling update must not unconfigure nodes; removal is driven by the
//! operator through `removing: true`).

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use tokio::sync::watch;

use crate::telemetry::LogFormat;

use super::apply::{apply_docker, execute, managed_files, scan, Roots};
use super::containerd::{check_containerd_config_with_imports, glob_matches, imports, is_blocking};
use super::duration::parse_duration;
use super::gate::Gate;
use super::plan::{reconcile_node_with_tls, Action, NodeCa, NodeClientCert, Root};
use super::protocol::{
    AgentStatus, ContainerdStatus, DesiredState, Problem, Reason, RegistryState, RegistryStatus,
    Runtime,
};
use super::reload::signal_reload;
use super::render::needs_override_path;

/// Desired-state files larger than this are rejected (a ConfigMap holds at most 1 MiB anyway).
const MAX_DESIRED_BYTES: u64 = 1024 * 1024;

/// Why a file mounted from the API server (the desired state, the mirror's CA, the node's
/// client certificate) was not read.
#[derive(Debug, thiserror::Error)]
enum ReadMountedError {
    #[error("larger than {MAX_DESIRED_BYTES} bytes")]
    TooLarge,
    #[error(transparent)]
    Read(std::io::Error),
}

/// Reads the mounted file at `path` with `read` (bytes or text), refusing, unread, one larger
/// than [`MAX_DESIRED_BYTES`].
async fn read_mounted<T, F, Fut>(path: &std::path::Path, read: F) -> Result<T, ReadMountedError>
where
    F: FnOnce(PathBuf) -> Fut,
    Fut: std::future::Future<Output = std::io::Result<T>>,
{
    match tokio::fs::metadata(path).await {
        Ok(m) if m.len() > MAX_DESIRED_BYTES => Err(ReadMountedError::TooLarge),
        Ok(_) => read(path.to_path_buf())
            .await
            .map_err(ReadMountedError::Read),
        Err(e) => Err(ReadMountedError::Read(e)),
    }
}

/// A problem with `reason`, for the message given.
fn problem_of(reason: Reason) -> impl Fn(String) -> Option<Problem> {
    move |message| Some(Problem { reason, message })
}

/// `cachalot-operator node-agent` command line.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// JSON desired state (a mounted ConfigMap key), polled for changes.
    #[arg(
        long,
        env = "CACHALOT_DESIRED_FILE",
        default_value = "/etc/cachalot/agent/desired.json"
    )]
    pub desired_file: PathBuf,
    /// containerd certs.d directory as mounted in the agent; the only place hosts.toml is written.
    #[arg(long, env = "CACHALOT_CERTS_DIR", default_value = "/host/certs.d")]
    pub certs_dir: PathBuf,
    /// containerd config.toml (read-only) to check that containerd reads certs.d.
    #[arg(long, env = "CACHALOT_CONTAINERD_CONFIG")]
    pub containerd_config: Option<PathBuf>,
    /// The certs.d path as containerd sees it on the host (e.g. /etc/containerd/certs.d); enables
    /// the `ConfigPathMismatch` check and is used for reported file paths.
    #[arg(long, env = "CACHALOT_HOST_CERTS_DIR")]
    pub host_certs_dir: Option<String>,
    /// containerd's config.toml as containerd sees it on the host (e.g.
    /// /etc/containerd/config.toml): its `imports` under that directory are read from the
    /// mounted one (`--containerd-config`'s directory).
    #[arg(long, env = "CACHALOT_HOST_CONTAINERD_CONFIG")]
    pub host_containerd_config: Option<String>,
    /// CRI-O `registries.conf.d` directory (as mounted), for runtime `Crio`.
    #[arg(long, env = "CACHALOT_REGISTRIES_CONF_DIR")]
    pub registries_conf_dir: Option<PathBuf>,
    /// CRI-O's pid file (as mounted; the pid is the host's, so the pod needs `hostPID`). When
    /// set, the agent sends CRI-O SIGHUP after changing its drop-in so that CRI-O re-reads
    /// registries.conf, and reports `RuntimeReloadFailed` until that succeeds.
    #[arg(long, env = "CACHALOT_CRIO_PID_FILE")]
    pub crio_pid_file: Option<PathBuf>,
    /// dockerd's `daemon.json` (as mounted, in a mounted directory), for runtime `Docker`.
    #[arg(long, env = "CACHALOT_DOCKER_CONFIG")]
    pub docker_config: Option<PathBuf>,
    /// `daemon.json` as dockerd sees it on the host (e.g. /etc/docker/daemon.json), for
    /// reported paths.
    #[arg(long, env = "CACHALOT_HOST_DOCKER_CONFIG")]
    pub host_docker_config: Option<String>,
    /// dockerd's pid file (as mounted; needs `hostPID`): SIGHUP after `daemon.json` changed,
    /// `RuntimeReloadFailed` until that succeeds.
    #[arg(long, env = "CACHALOT_DOCKER_PID_FILE")]
    pub docker_pid_file: Option<PathBuf>,
    /// Address of the status server (`/status`, `/healthz`, `/readyz`).
    #[arg(long, env = "CACHALOT_AGENT_LISTEN", default_value = "0.0.0.0:9464")]
    pub listen: SocketAddr,
    /// This node's name (from the downward API).
    #[arg(long, env = "NODE_NAME")]
    pub node_name: String,
    /// Time between reconcile rounds (Go duration).
    #[arg(long, default_value = "3s", value_parser = parse_duration)]
    pub interval: Duration,
    /// Upper bound for one `GET /v2/` probe (Go duration).
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub probe_timeout: Duration,
    /// Log format (structured JSON by default).
    #[arg(long, env = "CACHALOT_LOG_FORMAT", value_enum, default_value_t = LogFormat::Json)]
    pub log_format: LogFormat,
}

/// The agent could not run.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The status server could not bind.
    #[error("binding the status server to {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The status server failed.
    #[error("serving status: {0}")]
    Serve(std::io::Error),
    /// The signal handler could not be installed.
    #[error("installing the SIGTERM handler: {0}")]
    Signal(std::io::Error),
    /// The HTTP client for probes could not be built.
    #[error("building the probe HTTP client: {0}")]
    ProbeClient(reqwest::Error),
}

struct Shared {
    status: watch::Sender<AgentStatus>,
    ready: AtomicBool,
}

/// Runs the agent until SIGTERM or Ctrl-C.
///
/// # Errors
/// See [`RunError`]; bad input never ends the agent.
pub async fn run(args: Args) -> Result<(), RunError> {
    crate::telemetry::init(args.log_format);
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(RunError::Signal)?;
    let shutdown = async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        tracing::info!("shutting down on signal");
    };
    run_until(args, shutdown).await
}

/// Runs the agent until `shutdown` completes (tests pass their own trigger).
///
/// # Errors
/// See [`RunError`].
pub async fn run_until(
    args: Args,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), RunError> {
    // reqwest is built without a default crypto provider; a second install is harmless.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let (stop_tx, stop_rx) = watch::channel(false);
    let initial = AgentStatus {
        node: args.node_name.clone(),
        mirror: String::new(),
        generation: String::new(),
        ready: false,
        registries: Vec::new(),
        containerd: ContainerdStatus::default(),
        managed_files: Vec::new(),
        problems: Vec::new(),
    };
    let shared = Arc::new(Shared {
        status: watch::Sender::new(initial),
        ready: AtomicBool::new(false),
    });
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|source| RunError::Bind {
            addr: args.listen,
            source,
        })?;
    tracing::info!(listen = %args.listen, certs_dir = %args.certs_dir.display(), node = %args.node_name, "node agent started");
    let app = Router::new()
        .route("/status", get(status_handler))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(ready_handler))
        .with_state(shared.clone());
    let mut server_stop = stop_rx.clone();
    let server = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = server_stop.wait_for(|s| *s).await;
            })
            .await
    });
    let looper = Looper::new(args)?;
    let loop_task = tokio::spawn(looper.run(shared, stop_rx));
    shutdown.await;
    let _ = stop_tx.send(true);
    let _ = loop_task.await;
    match server.await {
        Ok(result) => result.map_err(RunError::Serve),
        Err(join) => Err(RunError::Serve(std::io::Error::other(join))),
    }
}

async fn status_handler(State(shared): State<Arc<Shared>>) -> Json<AgentStatus> {
    Json(shared.status.borrow().clone())
}

async fn ready_handler(State(shared): State<Arc<Shared>>) -> impl IntoResponse {
    if shared.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "ready")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not applied yet")
    }
}

struct Looper {
    args: Args,
    roots: Roots,
    client: reqwest::Client,
    insecure_client: reqwest::Client,
    gate: Gate,
    desired: Option<DesiredState>,
    last_desired_bytes: Vec<u8>,
    /// The runtime's configuration (CRI-O drop-in, daemon.json) changed and the runtime has not
    /// been told yet (retried every round).
    reload_pending: bool,
}

impl Looper {
    fn new(args: Args) -> Result<Self, RunError> {
        let build = |insecure: bool| {
            reqwest::Client::builder()
                .timeout(args.probe_timeout)
                .connect_timeout(args.probe_timeout)
                .no_proxy()
                .redirect(reqwest::redirect::Policy::none())
                .danger_accept_invalid_certs(insecure)
                .build()
                .map_err(RunError::ProbeClient)
        };
        Ok(Self {
            roots: Roots {
                certs_dir: args.certs_dir.clone(),
                registries_conf_dir: args.registries_conf_dir.clone(),
            },
            client: build(false)?,
            insecure_client: build(true)?,
            gate: Gate::default(),
            desired: None,
            last_desired_bytes: Vec::new(),
            reload_pending: false,
            args,
        })
    }

    async fn run(mut self, shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
        let mut ticker = tokio::time::interval(self.args.interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                _ = stop.wait_for(|s| *s) => return,
            }
            let (status, applied) = self.round().await;
            if applied {
                shared.ready.store(true, Ordering::Relaxed);
            }
            shared.status.send_replace(status);
        }
    }

    /// Reads the desired file; returns a problem when it cannot be used (the last good state is
    /// kept and re-applied).
    async fn read_desired(&mut self) -> Option<Problem> {
        let path = &self.args.desired_file;
        let bytes = match read_mounted(path, tokio::fs::read).await {
            Ok(b) => b,
            Err(e) => {
                return Some(Problem {
                    reason: Reason::DesiredStateInvalid,
                    message: format!("reading {}: {e}", path.display()),
                })
            }
        };
        if bytes == self.last_desired_bytes && self.desired.is_some() {
            return None;
        }
        match serde_json::from_slice::<DesiredState>(&bytes) {
            Ok(desired) => {
                if let Err(e) = super::names::validate_mirror(&desired.mirror) {
                    return Some(Problem {
                        reason: Reason::DesiredStateInvalid,
                        message: e.to_string(),
                    });
                }
                if let Err(e) = parse_duration(&desired.unreachable_after) {
                    return Some(Problem {
                        reason: Reason::DesiredStateInvalid,
                        message: format!("unreachableAfter: {e}"),
                    });
                }
                tracing::info!(mirror = %desired.mirror, generation = %desired.generation, removing = desired.removing, "desired state loaded");
                self.desired = Some(desired);
                self.last_desired_bytes = bytes;
                None
            }
            Err(e) => Some(Problem {
                reason: Reason::DesiredStateInvalid,
                message: format!("parsing {}: {e}", path.display()),
            }),
        }
    }

    /// The hosts directory as the runtime sees it: where installed CA and client files are named
    /// from in `hosts.toml`.
    fn host_certs_dir(&self) -> String {
        self.args
            .host_certs_dir
            .clone()
            .unwrap_or_else(|| self.args.certs_dir.display().to_string())
    }

    /// The mirror's CA for this round: `None` without `mirrorCaFile`, while removing, or when
    /// the file is absent or empty (a Secret without `ca.crt`); a problem when it cannot be
    /// read or holds no certificate.
    async fn mirror_ca(&self, desired: &DesiredState) -> (Option<NodeCa>, Option<Problem>) {
        let Some(path) = desired
            .mirror_ca_file
            .as_ref()
            .filter(|_| !desired.removing)
        else {
            return (None, None);
        };
        let problem = problem_of(Reason::MirrorCaInvalid);
        let pem = match read_mounted(std::path::Path::new(path), tokio::fs::read).await {
            Ok(bytes) => bytes,
            Err(e @ ReadMountedError::TooLarge) => return (None, problem(format!("{path}: {e}"))),
            Err(ReadMountedError::Read(e)) if e.kind() == std::io::ErrorKind::NotFound => {
                return (None, None)
            }
            Err(e) => return (None, problem(format!("reading {path}: {e}"))),
        };
        if pem.iter().all(u8::is_ascii_whitespace) {
            return (None, None);
        }
        let Ok(text) = String::from_utf8(pem) else {
            return (None, problem(format!("{path}: not UTF-8 PEM text")));
        };
        match reqwest::Certificate::from_pem_bundle(text.as_bytes()) {
            Ok(certs) if !certs.is_empty() => (
                Some(NodeCa {
                    pem: text,
                    host_certs_dir: self.host_certs_dir(),
                }),
                None,
            ),
            Ok(_) => (None, problem(format!("{path}: no PEM certificate"))),
            Err(e) => (None, problem(format!("{path}: {e}"))),
        }
    }

    /// The node's client certificate for this round: `None` without `mirrorClientCert` or while
    /// removing; a problem when a file cannot be read or the pair does not load (then `None`
    /// too: nodes are configured without it).
    async fn mirror_client_cert(
        &self,
        desired: &DesiredState,
    ) -> (Option<NodeClientCert>, Option<Problem>) {
        let Some(files) = desired
            .mirror_client_cert
            .as_ref()
            .filter(|_| !desired.removing)
        else {
            return (None, None);
        };
        let problem = problem_of(Reason::MirrorClientCertInvalid);
        let mut pems = Vec::new();
        for path in [&files.cert_file, &files.key_file] {
            match read_mounted(std::path::Path::new(path), tokio::fs::read_to_string).await {
                Ok(text) if !text.trim().is_empty() => pems.push(text),
                Ok(_) => return (None, problem(format!("{path} is empty"))),
                Err(e @ ReadMountedError::TooLarge) => {
                    return (None, problem(format!("{path}: {e}")))
                }
                Err(e) => return (None, problem(format!("reading {path}: {e}"))),
            }
        }
        let (Some(key_pem), Some(cert_pem)) = (pems.pop(), pems.pop()) else {
            return (None, problem("certificate and key not read".into()));
        };
        if let Err(e) = check_client_pair(&cert_pem, &key_pem) {
            return (
                None,
                problem(format!("{} with {}: {e}", files.cert_file, files.key_file)),
            );
        }
        (
            Some(NodeClientCert {
                cert_pem,
                key_pem,
                host_certs_dir: self.host_certs_dir(),
            }),
            None,
        )
    }

    async fn probe(
        &self,
        desired: &DesiredState,
        ca: Option<&NodeCa>,
        client_cert: Option<&NodeClientCert>,
    ) -> Vec<(String, bool)> {
        let mut probes = Vec::new();
        for reg in desired.registries.iter() {
            for endpoint in &reg.endpoints {
                let base = endpoint.trim_end_matches('/');
                let url = if needs_override_path(reg, endpoint) {
                    format!("{base}/")
                } else {
                    format!("{base}/v2/")
                };
                let client = if reg.skip_verify {
                    self.insecure_client.clone()
                } else {
                    self.client.clone()
                };
                let ca_file = reg.ca_file.clone();
                let ca_pem = ca.map(|c| c.pem.clone());
                let identity_pem = client_cert.map(|c| format!("{}\n{}", c.key_pem, c.cert_pem));
                let timeout = self.args.probe_timeout;
                let endpoint = endpoint.clone();
                probes.push(async move {
                    let loaded = match (ca_pem, ca_file, identity_pem) {
                        (Some(pem), _, identity) => Some(probe_client(
                            Some(pem.as_bytes()),
                            identity.as_deref().map(str::as_bytes),
                            timeout,
                        )),
                        (None, Some(file), identity) => Some(
                            client_with_ca(&file, identity.as_deref().map(str::as_bytes), timeout)
                                .await,
                        ),
                        (None, None, Some(identity)) => {
                            Some(probe_client(None, Some(identity.as_bytes()), timeout))
                        }
                        (None, None, None) => None,
                    };
                    let client = match loaded {
                        Some(loaded) => match loaded {
                            Ok(c) => c,
                            Err(e) => {
                                tracing::warn!(%endpoint, error = %e, "cannot load the probe's CA or client certificate");
                                return (endpoint, false);
                            }
                        },
                        None => client,
                    };
                    let answered = match client.get(&url).send().await {
                        Ok(resp) => resp.status().is_success() || resp.status() == reqwest::StatusCode::UNAUTHORIZED,
                        Err(e) => {
                            tracing::debug!(%endpoint, error = %e, "probe failed");
                            false
                        }
                    };
                    (endpoint, answered)
                });
            }
        }
        futures::future::join_all(probes).await
    }

    async fn round(&mut self) -> (AgentStatus, bool) {
        let mut problems: Vec<Problem> = self.read_desired().await.into_iter().collect();
        let node = self.args.node_name.clone();
        let Some(desired) = self.desired.clone() else {
            return (
                AgentStatus {
                    node,
                    mirror: String::new(),
                    generation: String::new(),
                    ready: false,
                    registries: Vec::new(),
                    containerd: self.containerd_status(Runtime::Containerd).await,
                    managed_files: Vec::new(),
                    problems,
                },
                false,
            );
        };
        let (node_ca, ca_problem) = self.mirror_ca(&desired).await;
        problems.extend(ca_problem);
        let (node_client, client_problem) = self.mirror_client_cert(&desired).await;
        problems.extend(client_problem);
        let unreachable_after =
            parse_duration(&desired.unreachable_after).unwrap_or(Duration::from_secs(30));
        let wanted: BTreeSet<String> = if desired.removing {
            BTreeSet::new()
        } else {
            desired
                .registries
                .iter()
                .flat_map(|r| r.endpoints.clone())
                .collect()
        };
        self.gate.retain(&wanted);
        if !desired.removing {
            let now = Instant::now();
            for (endpoint, answered) in self
                .probe(&desired, node_ca.as_ref(), node_client.as_ref())
                .await
            {
                if self
                    .gate
                    .observe(&endpoint, answered, now, unreachable_after)
                {
                    tracing::info!(%endpoint, live = answered, "endpoint liveness changed");
                }
            }
        }
        let live = self.gate.live_set();
        let live_for_docker = live.clone();
        let roots = self.roots.clone();
        let desired_for_io = desired.clone();
        let io = tokio::task::spawn_blocking(move || {
            let observed = scan(&roots, &desired_for_io.mirror)?;
            let plan = reconcile_node_with_tls(
                &desired_for_io,
                &observed,
                &live,
                node_ca.as_ref(),
                node_client.as_ref(),
            );
            let mut failures = Vec::new();
            let mut crio_changed = false;
            for action in &plan.actions {
                match execute(&roots, action) {
                    Ok(()) => {
                        crio_changed |= matches!(
                            action,
                            Action::Write {
                                root: Root::RegistriesConfDir,
                                ..
                            } | Action::Remove {
                                root: Root::RegistriesConfDir,
                                ..
                            }
                        );
                        tracing::info!(?action, "applied");
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "action failed");
                        failures.push(e.to_string());
                    }
                }
            }
            let after = scan(&roots, &desired_for_io.mirror)?;
            Ok::<_, super::apply::ScanError>((
                plan,
                failures,
                managed_files(&after, &desired_for_io.mirror),
                crio_changed,
            ))
        })
        .await;
        let (registries, managed, applied) = match io {
            Ok(Ok((plan, failures, managed, crio_changed))) => {
                self.reload_pending |= crio_changed;
                for message in &failures {
                    problems.push(Problem {
                        reason: Reason::WriteFailed,
                        message: message.clone(),
                    });
                }
                (plan.registries, managed, true)
            }
            Ok(Err(e)) => {
                problems.push(Problem {
                    reason: Reason::WriteFailed,
                    message: e.to_string(),
                });
                (Vec::new(), Vec::new(), false)
            }
            Err(e) => {
                problems.push(Problem {
                    reason: Reason::WriteFailed,
                    message: format!("apply task: {e}"),
                });
                (Vec::new(), Vec::new(), false)
            }
        };
        let (registries, managed) = if desired.runtime == Runtime::Docker {
            self.docker_round(&desired, live_for_docker, &mut problems)
                .await
                .unwrap_or((registries, managed))
        } else {
            (registries, managed)
        };
        if let Some(problem) = self.reload_runtime(desired.runtime) {
            problems.push(problem);
        }
        let containerd = self.containerd_status(desired.runtime).await;
        let managed_files = managed
            .into_iter()
            .map(|rel| self.display_path(desired.runtime, &rel))
            .collect();
        let ready = applied
            && problems.is_empty()
            && !desired.removing
            && registries
                .iter()
                .all(|r| r.state == RegistryState::Configured)
            && !containerd
                .problems
                .iter()
                .any(|p| is_blocking(p, containerd.config_version));
        let status = AgentStatus {
            node,
            mirror: desired.mirror.clone(),
            generation: if applied {
                desired.generation.clone()
            } else {
                String::new()
            },
            ready,
            registries,
            containerd,
            managed_files,
            problems,
        };
        (status, applied)
    }

    /// Runtime Docker: plans and applies `daemon.json` ([`apply_docker`]); the registries'
    /// outcome and the managed files (`daemon.json` while it holds our entry), or `None` when
    /// it could not run (the problem is recorded).
    async fn docker_round(
        &mut self,
        desired: &DesiredState,
        live: BTreeSet<String>,
        problems: &mut Vec<Problem>,
    ) -> Option<(Vec<RegistryStatus>, Vec<String>)> {
        let Some(config) = self.args.docker_config.clone() else {
            problems.push(Problem {
                reason: Reason::DesiredStateInvalid,
                message: "runtime Docker needs --docker-config (daemon.json as mounted)".into(),
            });
            return None;
        };
        let desired = desired.clone();
        let applied =
            tokio::task::spawn_blocking(move || apply_docker(&config, &desired, &live)).await;
        match applied {
            Ok(Ok((plan, changed))) => {
                self.reload_pending |= changed;
                let shown = self.args.host_docker_config.clone().unwrap_or_else(|| {
                    self.args
                        .docker_config
                        .as_deref()
                        .map(|p| p.display().to_string())
                        .unwrap_or_default()
                });
                let managed = plan.entry.as_ref().map(|_| shown).into_iter().collect();
                Some((plan.registries, managed))
            }
            Ok(Err(e)) => {
                problems.push(Problem {
                    reason: Reason::WriteFailed,
                    message: e.to_string(),
                });
                None
            }
            Err(e) => {
                problems.push(Problem {
                    reason: Reason::WriteFailed,
                    message: format!("daemon.json task: {e}"),
                });
                None
            }
        }
    }

    /// Sends the runtime SIGHUP when its configuration changed since it was last told and its
    /// pid file is configured; the problem to report while that fails. Without a pid file
    /// nothing is sent (the administrator reloads it; see docs/node-agent.md).
    fn reload_runtime(&mut self, runtime: Runtime) -> Option<Problem> {
        if !self.reload_pending {
            return None;
        }
        let (pid_file, name, command) = match runtime {
            Runtime::Crio => (&self.args.crio_pid_file, "CRI-O", "systemctl reload crio"),
            Runtime::Docker => (
                &self.args.docker_pid_file,
                "dockerd",
                "systemctl reload docker",
            ),
            Runtime::Containerd => (&None, "containerd", ""),
        };
        let Some(pid_file) = pid_file else {
            self.reload_pending = false;
            tracing::info!(
                runtime = name,
                "configuration changed; no pid file, the runtime is not signalled"
            );
            return None;
        };
        match signal_reload(pid_file, name) {
            Ok(pid) => {
                self.reload_pending = false;
                tracing::info!(
                    pid,
                    runtime = name,
                    "sent SIGHUP to re-read the configuration"
                );
                None
            }
            Err(e) => {
                tracing::warn!(error = %e, runtime = name, "runtime not reloaded; retrying next round");
                Some(Problem {
                    reason: Reason::RuntimeReloadFailed,
                    message: format!(
                        "{e}; {name} keeps its previous configuration until it gets SIGHUP (`{command}`)"
                    ),
                })
            }
        }
    }

    fn display_path(&self, runtime: Runtime, rel: &str) -> String {
        let crio = rel.ends_with(".conf") && !rel.contains('/');
        match (
            crio,
            runtime,
            &self.args.registries_conf_dir,
            &self.args.host_certs_dir,
        ) {
            (true, _, Some(dir), _) => dir.join(rel).display().to_string(),
            (false, _, _, Some(host)) => format!("{}/{rel}", host.trim_end_matches('/')),
            _ => self.args.certs_dir.join(rel).display().to_string(),
        }
    }

    async fn containerd_status(&self, runtime: Runtime) -> ContainerdStatus {
        let Some(path) = self
            .args
            .containerd_config
            .as_ref()
            .filter(|_| runtime == Runtime::Containerd)
        else {
            return ContainerdStatus::default();
        };
        match tokio::fs::read_to_string(path).await {
            Ok(text) => {
                let (mounted, host) = (path.clone(), self.args.host_containerd_config.clone());
                let wanted = imports(&text);
                let imported = if wanted.is_empty() {
                    Vec::new()
                } else {
                    tokio::task::spawn_blocking(move || {
                        read_imports(&mounted, host.as_deref(), &wanted)
                    })
                    .await
                    .unwrap_or_default()
                };
                check_containerd_config_with_imports(
                    &text,
                    &imported,
                    self.args.host_certs_dir.as_deref(),
                )
            }
            Err(e) => ContainerdStatus {
                config_version: None,
                problems: vec![Problem {
                    reason: Reason::ContainerdConfigUnreadable,
                    message: format!("reading {}: {e}", path.display()),
                }],
            },
        }
    }
}

/// Largest imported containerd config read.
const MAX_IMPORT_BYTES: u64 = 1024 * 1024;

/// Reads containerd's `imports` (host paths as written) through the mount of the config's
/// directory: `mounted_config` is config.toml as mounted, `host_config` as containerd sees it.
/// A relative import is relative to the config's directory; `*` matches within the last
/// component (sorted, as Go's glob); an import outside the mounted directory cannot be read and
/// says so. Each import with its host path and its text or why not.
fn read_imports(
    mounted_config: &std::path::Path,
    host_config: Option<&str>,
    wanted: &[String],
) -> Vec<(String, Result<String, String>)> {
    let Some(mounted_dir) = mounted_config.parent() else {
        return Vec::new();
    };
    let host_dir = host_config
        .and_then(|h| std::path::Path::new(h).parent())
        .map(|p| p.to_string_lossy().trim_end_matches('/').to_owned());
    let read = |path: &std::path::Path| match std::fs::metadata(path) {
        Ok(m) if m.len() > MAX_IMPORT_BYTES => Err(format!("larger than {MAX_IMPORT_BYTES} bytes")),
        Ok(_) => std::fs::read_to_string(path).map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    let mut out = Vec::new();
    for import in wanted {
        let relative = match (import.strip_prefix('/'), &host_dir) {
            (None, _) => Some(import.as_str()),
            (Some(_), Some(dir)) => import.strip_prefix(&format!("{dir}/")),
            (Some(_), None) => None,
        };
        let Some(relative) = relative.filter(|r| !r.split('/').any(|c| c == "..")) else {
            out.push((
                import.clone(),
                Err("outside the directory the agent mounts; not inspected".into()),
            ));
            continue;
        };
        let shown = |name: &str| match &host_dir {
            Some(dir) if !import.starts_with('/') => format!("{dir}/{name}"),
            _ => name.to_owned(),
        };
        let (dir_part, file_part) = relative.rsplit_once('/').unwrap_or(("", relative));
        if file_part.contains('*') {
            let dir = mounted_dir.join(dir_part);
            let mut names: Vec<String> = std::fs::read_dir(&dir)
                .map(|entries| {
                    entries
                        .filter_map(Result::ok)
                        .map(|e| e.file_name().to_string_lossy().into_owned())
                        .filter(|n| glob_matches(file_part, n))
                        .collect()
                })
                .unwrap_or_default();
            names.sort();
            for name in names {
                let host_path = match import.rsplit_once('/') {
                    Some((prefix, _)) => format!("{prefix}/{name}"),
                    None => shown(&name),
                };
                out.push((host_path, read(&dir.join(&name))));
            }
        } else {
            let host_path = if import.starts_with('/') {
                import.clone()
            } else {
                shown(relative)
            };
            out.push((host_path, read(&mounted_dir.join(relative))));
        }
    }
    out
}

/// The check containerd's `tls.LoadX509KeyPair` makes before it uses a `client` pair: the
/// certificate and the key parse, and the key is the certificate's. containerd fails every pull
/// of a registry whose `hosts.toml` names a pair that does not load (not only the mirror's), so
/// such a pair is never installed.
///
/// # Errors
/// What is wrong, as a sentence.
pub fn check_client_pair(cert_pem: &str, key_pem: &str) -> Result<(), String> {
    use rustls::pki_types::pem::PemObject as _;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let chain = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("the certificate is not PEM: {e}"))?;
    if chain.is_empty() {
        return Err("no PEM certificate".into());
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
        .map_err(|e| format!("no PEM private key: {e}"))?;
    rustls::sign::CertifiedKey::from_der(chain, key, &rustls::crypto::ring::default_provider())
        .map(|_| ())
        .map_err(|e| format!("the key does not load with the certificate: {e}"))
}

async fn client_with_ca(
    ca_file: &str,
    identity_pem: Option<&[u8]>,
    timeout: Duration,
) -> Result<reqwest::Client, String> {
    let pem = tokio::fs::read(ca_file)
        .await
        .map_err(|e| format!("{ca_file}: {e}"))?;
    probe_client(Some(&pem), identity_pem, timeout).map_err(|e| format!("{ca_file}: {e}"))
}

/// A probe client trusting the certificates of `ca_pem` in addition to the system roots, and
/// presenting the client certificate of `identity_pem` (key and certificate, PEM) when the
/// server asks for one.
fn probe_client(
    ca_pem: Option<&[u8]>,
    identity_pem: Option<&[u8]>,
    timeout: Duration,
) -> Result<reqwest::Client, String> {
    let mut builder = reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(timeout)
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none());
    if let Some(pem) = ca_pem {
        for cert in reqwest::Certificate::from_pem_bundle(pem).map_err(|e| e.to_string())? {
            builder = builder.add_root_certificate(cert);
        }
    }
    if let Some(pem) = identity_pem {
        builder = builder.identity(reqwest::Identity::from_pem(pem).map_err(|e| e.to_string())?);
    }
    builder.build().map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_client_pair_loads_only_with_its_own_key() {
        let ca = cachalot_testkit::certs::TestCa::new("client CA").unwrap();
        let (node, other) = (ca.client("node").unwrap(), ca.client("other").unwrap());
        assert_eq!(check_client_pair(&node.cert_pem, &node.key_pem), Ok(()));
        let mismatch = check_client_pair(&node.cert_pem, &other.key_pem).unwrap_err();
        assert!(mismatch.contains("does not load"), "{mismatch}");
        assert!(check_client_pair("", &node.key_pem).is_err());
        assert!(check_client_pair(&node.cert_pem, &node.cert_pem).is_err());
    }

    #[test]
    fn imports_are_read_through_the_mount_with_globs_and_never_outside_it() {
        let dir = tempfile::tempdir().unwrap();
        let mounted = dir.path().join("config.toml");
        std::fs::create_dir(dir.path().join("conf.d")).unwrap();
        std::fs::write(dir.path().join("conf.d/20-b.toml"), "b").unwrap();
        std::fs::write(dir.path().join("conf.d/10-a.toml"), "a").unwrap();
        std::fs::write(dir.path().join("conf.d/x.bak"), "x").unwrap();
        std::fs::write(dir.path().join("local.toml"), "l").unwrap();
        let wanted = [
            "/etc/containerd/conf.d/*.toml".to_string(),
            "local.toml".to_string(),
            "/etc/containerd/missing.toml".to_string(),
            "/opt/other.toml".to_string(),
            "/etc/containerd/../shadow".to_string(),
        ];
        let got = read_imports(&mounted, Some("/etc/containerd/config.toml"), &wanted);
        let shown: Vec<(&str, Result<&str, bool>)> = got
            .iter()
            .map(|(p, r)| (p.as_str(), r.as_deref().map_err(|e| e.contains("outside"))))
            .collect();
        assert_eq!(
            shown,
            vec![
                ("/etc/containerd/conf.d/10-a.toml", Ok("a")),
                ("/etc/containerd/conf.d/20-b.toml", Ok("b")),
                ("/etc/containerd/local.toml", Ok("l")),
                ("/etc/containerd/missing.toml", Err(false)),
                ("/opt/other.toml", Err(true)),
                ("/etc/containerd/../shadow", Err(true)),
            ]
        );
    }
}
