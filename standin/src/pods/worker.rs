//! One pod's life on the node: network, volumes, images, container processes, probes,
//! restarts, status, and teardown on deletion.
//!
//! Every [`TICK`] and on every change of the pod object the worker runs one sync pass
//! (level-triggered: it compares the pod with what runs): set up the network namespace once,
//! set up or refresh the volumes, advance the first unfinished init container or else every app
//! container (notice exits, apply probe results, start or restart after the backoff), then
//! build the status and patch it when it differs from the last one written. Long actions
//! (image pulls) run in tasks polled by the pass, so a deletion is noticed within a tick.
//!
//! Restarts back off from [`BACKOFF_START`] doubling to [`BACKOFF_CAP`] (the kubelet's cap is
//! 5 minutes; shortened so tests are quick), reset after a run of twice the cap.
//!
//! Deletion (`deletionTimestamp` set): SIGTERM to every container's process group, up to
//! `deletionGracePeriodSeconds` (at most [`MAX_GRACE`]), SIGKILL, remove the network namespace
//! and the pod directory, then delete the pod with grace 0 and a uid precondition, as the kubelet
//! does. A pod that vanished from the API is torn down the same way (grace [`VANISHED_GRACE`]).
//! On stand-in shutdown the processes are stopped and the namespace removed, the API untouched.
//!
//! Invariants: a container process is only ever signalled through its own process group; the
//! status is written only when it changed; a pod found terminal (`Succeeded`/`Failed`) is not
//! run again; the worker loop ends when the pod is gone or the stand-in stops, each pass is
//! bounded (no pass waits for a process except during teardown, which has deadlines).

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::FutureExt;
use k8s_openapi::api::core::v1::{Container, Pod, PodCondition, PodStatus};
use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, Patch, PatchParams, Preconditions};
use kube::Api;
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use sha2::{Digest, Sha256};
use tokio::process::Child;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn, Instrument};

use super::env::{container_env, expand, expanded_argv, EnvInputs};
use super::image::{
    decide_pull, effective_policy, image_id, normalize, PullDecision, PullImageError, Puller,
};
use super::launch::{
    group, home_of, hosts, passwd, prepare_rootfs, resolve_identity, spawn, Identity, LaunchPlan,
    RootfsFiles, VolumeBind,
};
use super::probe::{self, ProbeKind, ProbeResult, ProbeTarget, RunningProbe};
use super::status::{self, ContainerView, Phase, PodView, RunState, Termination, OWNED_CONDITIONS};
use super::volumes::{PodVolumes, VolumeInputs, VolumesNotReady};
use super::{LogFiles, NodeRuntime};
use crate::netns::{self, netns_path, PodNetwork};

/// Period of the sync pass.
pub const TICK: Duration = Duration::from_millis(500);
/// First restart delay.
pub const BACKOFF_START: Duration = Duration::from_secs(1);
/// Longest restart delay.
pub const BACKOFF_CAP: Duration = Duration::from_secs(10);
/// Longest grace period honoured on deletion.
pub const MAX_GRACE: Duration = Duration::from_secs(30);
/// Grace period of a pod that vanished from the API (force-deleted).
pub const VANISHED_GRACE: Duration = Duration::from_secs(2);
/// Grace period on stand-in shutdown.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// How long a status the API server refused as invalid is not sent again.
pub const REFUSED_RETRY: Duration = Duration::from_secs(30);
/// The field manager of status patches.
pub const FIELD_MANAGER: &str = "cachalot-standin";

/// Why an image is not usable for a start.
#[derive(Debug, thiserror::Error)]
enum EnsureImageError {
    #[error("Container image \"{0}\" is not present with pull policy of Never")]
    NeverPull(String),
    #[error(transparent)]
    Pull(#[from] PullImageError),
}

async fn ensure_image(
    puller: Puller,
    normalized: String,
    policy: super::image::PullPolicy,
) -> Result<String, EnsureImageError> {
    let present = puller.present_digest(&normalized).await?;
    match decide_pull(policy, present.is_some()) {
        PullDecision::UsePresent => Ok(present.unwrap_or_default()),
        PullDecision::NeverPullAbsent => Err(EnsureImageError::NeverPull(normalized)),
        PullDecision::Pull => Ok(puller.pull(&normalized).await?),
    }
}

/// How the image of a start attempt is provided.
enum ImageUse {
    /// `--image` directory.
    Local(PathBuf),
    /// Pulled through containerd; its files are not run.
    Pulled,
}

struct Kill {
    deadline: Instant,
    sigkilled: bool,
}

struct Run {
    child: Child,
    pid: Option<u32>,
    started: Instant,
    started_at: Timestamp,
    container_id: String,
    target: ProbeTarget,
    startup: Option<RunningProbe>,
    readiness: Option<RunningProbe>,
    liveness: Option<RunningProbe>,
    kill: Option<Kill>,
}

fn signal_group(pid: Option<u32>, signal: Signal) {
    if let Some(pid) = pid.and_then(|p| i32::try_from(p).ok()) {
        let _ = killpg(Pid::from_raw(pid), signal);
    }
}

impl Run {
    fn stop(&mut self, grace: Duration) {
        if self.kill.is_none() {
            signal_group(self.pid, Signal::SIGTERM);
            self.kill = Some(Kill {
                deadline: Instant::now() + grace,
                sigkilled: false,
            });
        }
    }
}

struct Slot {
    spec: Container,
    is_init: bool,
    view: ContainerView,
    run: Option<Run>,
    backoff: Duration,
    next_attempt: Instant,
    pull: Option<JoinHandle<Result<String, EnsureImageError>>>,
    image_id: Option<String>,
    runs: u32,
    finished: bool,
    log: PathBuf,
    previous_log: PathBuf,
    rootfs: PathBuf,
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(pull) = self.pull.take() {
            pull.abort();
        }
        if let Some(run) = &self.run {
            signal_group(run.pid, Signal::SIGKILL);
        }
    }
}

fn waiting(reason: &str, message: impl Into<String>) -> RunState {
    RunState::Waiting {
        reason: reason.to_owned(),
        message: Some(message.into()),
    }
}

impl Slot {
    fn new(spec: &Container, is_init: bool, pod_dir: &Path) -> Self {
        Self {
            view: ContainerView {
                name: spec.name.clone(),
                image: spec.image.clone().unwrap_or_default(),
                image_id: String::new(),
                state: RunState::Waiting {
                    reason: "ContainerCreating".to_owned(),
                    message: None,
                },
                last: None,
                restart_count: 0,
                ready: false,
                started: false,
                container_id: None,
            },
            spec: spec.clone(),
            is_init,
            run: None,
            backoff: BACKOFF_START,
            next_attempt: Instant::now(),
            pull: None,
            image_id: None,
            runs: 0,
            finished: false,
            log: pod_dir.join(format!("{}.log", spec.name)),
            previous_log: pod_dir.join(format!("{}.previous.log", spec.name)),
            rootfs: pod_dir.join(&spec.name).join("rootfs"),
        }
    }

    fn set_waiting(&mut self, reason: &str, message: impl Into<String>) {
        self.view.state = waiting(reason, message);
        self.view.ready = false;
        self.view.started = false;
    }

    /// Waits `backoff` before the next attempt and doubles it.
    fn back_off(&mut self) {
        self.next_attempt = Instant::now() + self.backoff;
        self.backoff = (self.backoff * 2).min(BACKOFF_CAP);
    }

    fn log_files(&self) -> LogFiles {
        LogFiles {
            current: self.log.clone(),
            previous: self.previous_log.clone(),
            running: self.run.is_some(),
        }
    }
}

/// What a start attempt needs from the pod worker.
struct StartContext<'a> {
    rt: &'a NodeRuntime,
    pod: &'a Pod,
    netns: Option<PathBuf>,
    pod_ip: Ipv4Addr,
    hostname: String,
    locations: &'a BTreeMap<String, PathBuf>,
    restart_policy: &'a str,
    grace: Duration,
}

fn now_ts() -> Timestamp {
    let now = Timestamp::now();
    Timestamp::from_second(now.as_second()).unwrap_or(now)
}

fn local_image_id(normalized: &str) -> String {
    format!(
        "sha256:{}",
        hex::encode(Sha256::digest(normalized.as_bytes()))
    )
}

fn image_files(dir: &Path) -> Vec<(String, PathBuf)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<(String, PathBuf)> = entries
        .flatten()
        .filter_map(|entry| {
            let resolved = std::fs::canonicalize(entry.path()).ok()?;
            resolved
                .is_file()
                .then(|| (entry.file_name().to_string_lossy().into_owned(), resolved))
        })
        .collect();
    files.sort();
    files
}

/// Decides the image of a start; `None` means "not yet" (the slot's state says why).
fn prepare_image(slot: &mut Slot, cx: &StartContext<'_>) -> Option<ImageUse> {
    let image = slot.spec.image.clone().unwrap_or_default();
    let normalized = normalize(&image);
    if let Some(dir) = cx.rt.images.get(&normalized) {
        slot.view.image_id = local_image_id(&normalized);
        return Some(ImageUse::Local(dir.clone()));
    }
    if let Some(handle) = slot.pull.as_mut() {
        let result = handle.now_or_never()?;
        slot.pull = None;
        return match result {
            Ok(Ok(digest)) => {
                slot.view.image_id = image_id(&normalized, &digest);
                slot.image_id = Some(slot.view.image_id.clone());
                Some(ImageUse::Pulled)
            }
            Ok(Err(EnsureImageError::NeverPull(_))) => {
                slot.set_waiting(
                    "ErrImageNeverPull",
                    format!("Container image \"{image}\" is not present with pull policy of Never"),
                );
                slot.back_off();
                None
            }
            Ok(Err(error)) => {
                slot.set_waiting("ErrImagePull", error.to_string());
                slot.back_off();
                None
            }
            Err(join) => {
                slot.set_waiting("ErrImagePull", format!("pull task failed: {join}"));
                slot.back_off();
                None
            }
        };
    }
    let Some(puller) = cx.rt.puller.clone() else {
        slot.set_waiting(
            "ErrImagePull",
            format!("image {image} is not a local image and no containerd socket is configured"),
        );
        slot.back_off();
        return None;
    };
    let policy = effective_policy(slot.spec.image_pull_policy.as_deref(), &image);
    slot.pull = Some(tokio::spawn(ensure_image(puller, normalized, policy)));
    if !matches!(&slot.view.state, RunState::Waiting { reason, .. } if reason == "ImagePullBackOff")
    {
        slot.set_waiting("ContainerCreating", format!("Pulling image \"{image}\""));
    }
    None
}

fn volume_binds(
    spec: &Container,
    locations: &BTreeMap<String, PathBuf>,
    env: &BTreeMap<String, String>,
) -> Result<Vec<VolumeBind>, String> {
    let mut binds = Vec::new();
    for mount in spec.volume_mounts.iter().flatten() {
        let location = locations
            .get(&mount.name)
            .ok_or_else(|| format!("volume \"{}\" is not defined by the pod", mount.name))?;
        let sub_path = match (&mount.sub_path, &mount.sub_path_expr) {
            (Some(sub), _) if !sub.is_empty() => Some(sub.clone()),
            (_, Some(expr)) if !expr.is_empty() => {
                let lookup = |name: &str| env.get(name).cloned();
                Some(expand(expr, &lookup))
            }
            _ => None,
        };
        let source = match sub_path {
            Some(sub) => {
                if Path::new(&sub)
                    .components()
                    .any(|c| !matches!(c, std::path::Component::Normal(_)))
                {
                    return Err(format!(
                        "subPath {sub:?} must be a relative path without .."
                    ));
                }
                let source = location.join(&sub);
                if std::fs::symlink_metadata(&source).is_err() {
                    std::fs::create_dir_all(&source)
                        .map_err(|e| format!("create subPath {}: {e}", source.display()))?;
                }
                source
            }
            None => location.clone(),
        };
        binds.push(VolumeBind {
            is_file: source.is_file(),
            source,
            target: mount.mount_path.clone(),
            read_only: mount.read_only.unwrap_or(false),
        });
    }
    Ok(binds)
}

fn start_probes(run: &mut Run, spec: &Container, http: &reqwest::Client, after_startup: bool) {
    if !after_startup {
        if let Some(p) = &spec.startup_probe {
            run.startup = Some(probe::start(
                ProbeKind::Startup,
                p.clone(),
                run.target.clone(),
                http.clone(),
            ));
            return;
        }
    }
    if let Some(p) = &spec.readiness_probe {
        run.readiness = Some(probe::start(
            ProbeKind::Readiness,
            p.clone(),
            run.target.clone(),
            http.clone(),
        ));
    }
    if let Some(p) = &spec.liveness_probe {
        run.liveness = Some(probe::start(
            ProbeKind::Liveness,
            p.clone(),
            run.target.clone(),
            http.clone(),
        ));
    }
}

/// One start attempt; leaves the slot running or waiting with a reason.
fn try_start(slot: &mut Slot, cx: &StartContext<'_>) {
    let Some(image) = prepare_image(slot, cx) else {
        return;
    };
    let pod_security = cx
        .pod
        .spec
        .as_ref()
        .and_then(|s| s.security_context.as_ref());
    let identity = match resolve_identity(pod_security, slot.spec.security_context.as_ref()) {
        Ok(identity) => identity,
        Err(error) => {
            slot.set_waiting("CreateContainerConfigError", error.to_string());
            slot.back_off();
            return;
        }
    };
    let namespace = cx.pod.metadata.namespace.clone().unwrap_or_default();
    let sources = cx.rt.sources(&namespace);
    let inputs = EnvInputs {
        pod: cx.pod,
        pod_ip: Some(cx.pod_ip.to_string()),
        host_ip: cx.rt.node_ip.to_string(),
        kubernetes_service: cx.rt.kubernetes_service,
        hostname: cx.hostname.clone(),
        home: home_of(identity.uid).to_owned(),
    };
    let env = match container_env(&slot.spec, &inputs, &sources) {
        Ok(env) => env,
        Err(error) => {
            slot.set_waiting("CreateContainerConfigError", error.to_string());
            slot.back_off();
            return;
        }
    };
    let argv = expanded_argv(&slot.spec, &env);
    let image_dir = match image {
        ImageUse::Local(dir) => Some(dir),
        ImageUse::Pulled if slot.spec.command.as_ref().is_none_or(Vec::is_empty) => {
            slot.set_waiting(
                "CreateContainerError",
                format!(
                    "cachalot-standin cannot run the files of image {}: the container must set a command, which runs with the host's binaries",
                    slot.view.image
                ),
            );
            slot.back_off();
            return;
        }
        ImageUse::Pulled => None,
    };
    if argv.is_empty() {
        slot.set_waiting(
            "CreateContainerError",
            "the container sets no command and cachalot-standin does not know the image's entrypoint",
        );
        slot.back_off();
        return;
    }
    let volumes = match volume_binds(&slot.spec, cx.locations, &env) {
        Ok(binds) => binds,
        Err(message) => {
            slot.set_waiting("CreateContainerConfigError", message);
            slot.back_off();
            return;
        }
    };
    if let Err(message) = launch(slot, cx, identity, env, argv, volumes, image_dir) {
        slot.set_waiting("RunContainerError", message);
        slot.back_off();
    }
}

fn launch(
    slot: &mut Slot,
    cx: &StartContext<'_>,
    identity: Identity,
    env: BTreeMap<String, String>,
    argv: Vec<String>,
    volumes: Vec<VolumeBind>,
    image_dir: Option<PathBuf>,
) -> Result<(), String> {
    let files = RootfsFiles {
        passwd: passwd(&identity),
        group: group(&identity),
        hosts: hosts(&cx.hostname, &cx.pod_ip.to_string()),
        hostname: format!("{}\n", cx.hostname),
        symlinks: cx.rt.host_layout.0.clone(),
    };
    prepare_rootfs(&slot.rootfs, &files).map_err(|e| e.to_string())?;
    let security = slot.spec.security_context.as_ref();
    let plan = LaunchPlan {
        netns: cx.netns.clone(),
        rootfs: slot.rootfs.clone(),
        host_dirs: cx.rt.host_layout.1.clone(),
        bind_ssl: Path::new("/etc/ssl").is_dir(),
        image_files: image_dir.as_deref().map(image_files).unwrap_or_default(),
        volumes,
        read_only_root: security
            .and_then(|s| s.read_only_root_filesystem)
            .unwrap_or(false),
        identity: identity.clone(),
        working_dir: slot
            .spec
            .working_dir
            .clone()
            .unwrap_or_else(|| "/".to_owned()),
        argv,
    };
    if slot.runs > 0 && slot.log.exists() {
        let _ = std::fs::rename(&slot.log, &slot.previous_log);
    }
    let env: Vec<(String, String)> = env.into_iter().collect();
    let child = spawn(&plan, &env, &slot.log).map_err(|e| e.to_string())?;
    let pid = child.id();
    if slot.runs > 0 {
        slot.view.restart_count = slot.view.restart_count.saturating_add(1);
    }
    slot.runs = slot.runs.saturating_add(1);
    let uid = cx.pod.metadata.uid.clone().unwrap_or_default();
    let container_id = format!(
        "standin://{}",
        hex::encode(&Sha256::digest(format!("{uid}/{}/{}", slot.spec.name, slot.runs))[..16])
    );
    let started_at = now_ts();
    let mut run = Run {
        child,
        pid,
        started: Instant::now(),
        started_at,
        container_id: container_id.clone(),
        target: ProbeTarget {
            pod_ip: IpAddr::V4(cx.pod_ip),
            ports: slot.spec.ports.clone().unwrap_or_default(),
            pid,
            identity,
            env,
        },
        startup: None,
        readiness: None,
        liveness: None,
        kill: None,
    };
    start_probes(&mut run, &slot.spec, &cx.rt.http, false);
    slot.view.started = run.startup.is_none();
    slot.view.ready = slot.view.started && run.readiness.is_none();
    slot.view.state = RunState::Running { started_at };
    slot.view.container_id = Some(container_id);
    info!(container = %slot.spec.name, pid = ?pid, "container started");
    slot.run = Some(run);
    Ok(())
}

fn exit_code(status: ExitStatus) -> (i32, Option<i32>) {
    match (status.code(), status.signal()) {
        (Some(code), _) => (code, None),
        (None, Some(signal)) => (128 + signal, Some(signal)),
        (None, None) => (-1, None),
    }
}

fn should_restart(is_init: bool, restart_policy: &str, code: i32) -> bool {
    match (is_init, restart_policy) {
        (true, "Never") => false,
        (true, _) => code != 0,
        (false, "Always") => true,
        (false, "OnFailure") => code != 0,
        (false, _) => false,
    }
}

fn on_exit(slot: &mut Slot, run: Run, status: ExitStatus, restart_policy: &str, pod_name: &str) {
    let (code, signal) = exit_code(status);
    // `FallbackToLogsOnError`: a failed container's message is the tail of its log (the
    // termination-log file itself is not emulated, so `File` reports nothing).
    let message = (code != 0
        && slot.spec.termination_message_policy.as_deref() == Some("FallbackToLogsOnError"))
    .then(|| std::fs::read(&slot.log).ok())
    .flatten()
    .map(|log| termination_message_from_log(&log))
    .filter(|m| !m.is_empty());
    let termination = Termination {
        exit_code: code,
        signal,
        reason: if code == 0 { "Completed" } else { "Error" }.to_owned(),
        message,
        started_at: Some(run.started_at),
        finished_at: now_ts(),
        container_id: Some(run.container_id.clone()),
    };
    info!(container = %slot.spec.name, code, "container exited");
    slot.view.ready = false;
    slot.view.started = false;
    if should_restart(slot.is_init, restart_policy, code) {
        if run.started.elapsed() > BACKOFF_CAP * 2 {
            slot.backoff = BACKOFF_START;
        }
        let delay = slot.backoff;
        slot.view.last = Some(termination);
        slot.view.state = waiting(
            "CrashLoopBackOff",
            format!(
                "back-off {}s restarting failed container={} pod={pod_name}",
                delay.as_secs(),
                slot.spec.name
            ),
        );
        slot.back_off();
    } else {
        slot.view.state = RunState::Terminated(termination);
        slot.finished = true;
    }
}

/// The kubelet's `FallbackToLogsOnError` message: the last 80 lines of the log, at most the last
/// 2048 bytes of them. Pure.
fn termination_message_from_log(log: &[u8]) -> String {
    const MAX_LINES: usize = 80;
    const MAX_BYTES: usize = 2048;
    let text = String::from_utf8_lossy(log);
    let trimmed = text.trim_end_matches('\n');
    let lines: Vec<&str> = trimmed.lines().collect();
    let tail = lines[lines.len().saturating_sub(MAX_LINES)..].join("\n");
    let start = tail.len().saturating_sub(MAX_BYTES);
    // Cut at a character boundary.
    let start = (start..=tail.len())
        .find(|i| tail.is_char_boundary(*i))
        .unwrap_or(tail.len());
    tail[start..].to_owned()
}

/// Advances one container: exit, probes, kill deadlines, or a (re)start when due.
fn step(slot: &mut Slot, cx: &StartContext<'_>) {
    if let Some(run) = slot.run.as_mut() {
        match run.child.try_wait() {
            Ok(Some(status)) => {
                if let Some(run) = slot.run.take() {
                    let name = cx.pod.metadata.name.clone().unwrap_or_default();
                    on_exit(slot, run, status, cx.restart_policy, &name);
                }
            }
            Ok(None) => watch_run(slot, cx),
            Err(error) => {
                warn!(container = %slot.spec.name, %error, "cannot poll the container process")
            }
        }
        return;
    }
    if slot.finished {
        return;
    }
    if Instant::now() < slot.next_attempt {
        if let RunState::Waiting { reason, message } = &slot.view.state {
            if reason == "ErrImagePull" {
                let message = format!(
                    "Back-off pulling image \"{}\": {}",
                    slot.view.image,
                    message.clone().unwrap_or_default()
                );
                slot.set_waiting("ImagePullBackOff", message);
            }
        }
        return;
    }
    try_start(slot, cx);
}

fn watch_run(slot: &mut Slot, cx: &StartContext<'_>) {
    let Some(run) = slot.run.as_mut() else {
        return;
    };
    let result = |p: &Option<RunningProbe>| p.as_ref().map(|p| *p.result.borrow());
    match result(&run.startup) {
        Some(ProbeResult::Success) if !slot.view.started => {
            slot.view.started = true;
            start_probes(run, &slot.spec, &cx.rt.http, true);
        }
        Some(ProbeResult::Failure) => {
            info!(container = %slot.spec.name, "startup probe failed; restarting");
            run.stop(cx.grace);
        }
        _ => {}
    }
    if result(&run.liveness) == Some(ProbeResult::Failure) {
        info!(container = %slot.spec.name, "liveness probe failed; restarting");
        run.stop(cx.grace);
    }
    slot.view.ready = slot.view.started
        && run.kill.is_none()
        && result(&run.readiness).is_none_or(|r| r == ProbeResult::Success);
    if let Some(kill) = run.kill.as_mut() {
        if !kill.sigkilled && Instant::now() >= kill.deadline {
            signal_group(run.pid, Signal::SIGKILL);
            kill.sigkilled = true;
        }
    }
}

/// Why a pod's teardown or deletion failed.
#[derive(Debug, thiserror::Error)]
pub enum TearDownPodError {
    /// The final delete failed.
    #[error("delete pod {namespace}/{name}: {source}")]
    Delete {
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
        /// Why.
        source: kube::Error,
    },
}

/// A pod's worker state.
struct PodWorker {
    rt: Arc<NodeRuntime>,
    uid: String,
    namespace: String,
    name: String,
    pod_dir: PathBuf,
    host_network: bool,
    ip: Option<Ipv4Addr>,
    network: Option<PodNetwork>,
    sandbox_error: Option<String>,
    volumes: PodVolumes,
    volumes_wait: Option<VolumesNotReady>,
    init: Vec<Slot>,
    containers: Vec<Slot>,
    start_time: Timestamp,
    conditions: Vec<PodCondition>,
    last_status: Option<PodStatus>,
    /// A status the API server refused, and when: not sent again for [`REFUSED_RETRY`].
    refused: Option<(PodStatus, Instant)>,
    /// The pod was already terminal when this worker started: its status is left alone (the
    /// API server refuses to move terminated containers back to waiting).
    adopted_terminal: bool,
    terminal: Option<Phase>,
}

impl PodWorker {
    fn new(rt: Arc<NodeRuntime>, pod: &Pod) -> Self {
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        let pod_dir = rt.run_dir.join("pods").join(&uid);
        let spec = pod.spec.clone().unwrap_or_default();
        let status = pod.status.clone().unwrap_or_default();
        let terminal = match status.phase.as_deref() {
            Some("Succeeded") => Some(Phase::Succeeded),
            Some("Failed") => Some(Phase::Failed),
            _ => None,
        };
        Self {
            uid,
            namespace: pod.metadata.namespace.clone().unwrap_or_default(),
            name: pod.metadata.name.clone().unwrap_or_default(),
            host_network: spec.host_network.unwrap_or(false),
            ip: None,
            network: None,
            sandbox_error: None,
            volumes: PodVolumes::new(pod_dir.join("volumes")),
            volumes_wait: None,
            init: spec
                .init_containers
                .iter()
                .flatten()
                .map(|c| Slot::new(c, true, &pod_dir))
                .collect(),
            containers: spec
                .containers
                .iter()
                .map(|c| Slot::new(c, false, &pod_dir))
                .collect(),
            start_time: status.start_time.map_or_else(now_ts, |t| t.0),
            conditions: status.conditions.unwrap_or_default(),
            last_status: None,
            refused: None,
            adopted_terminal: terminal.is_some(),
            terminal,
            pod_dir,
            rt,
        }
    }

    fn pod_ip(&self) -> Option<Ipv4Addr> {
        if self.host_network {
            Some(self.rt.node_ip)
        } else {
            self.network.as_ref().map(|n| n.ip)
        }
    }

    async fn ensure_network(&mut self, pod: &Pod) {
        if self.host_network || self.network.is_some() {
            return;
        }
        let ip = match self.ip {
            Some(ip) => ip,
            None => match self.rt.allocate_ip(pod) {
                Some(ip) => {
                    self.ip = Some(ip);
                    ip
                }
                None => {
                    self.sandbox_error =
                        Some(format!("no free IP in pod CIDR {}", self.rt.pod_cidr));
                    return;
                }
            },
        };
        let network = PodNetwork::new(&self.rt.netns_prefix, &self.uid, ip);
        match netns::create(&network, &self.rt.wiring).await {
            Ok(()) => {
                debug!(netns = %network.netns, %ip, "pod network created");
                self.network = Some(network);
                self.sandbox_error = None;
            }
            Err(error) => {
                warn!(%error, "pod network set-up failed");
                self.sandbox_error = Some(format!("FailedCreatePodSandBox: {error}"));
            }
        }
    }

    async fn sync(&mut self, pod: &Pod) {
        if self.terminal.is_none() {
            self.run_containers(pod).await;
        }
        self.publish_logs();
        if !self.adopted_terminal {
            self.write_status(pod).await;
        }
    }

    async fn run_containers(&mut self, pod: &Pod) {
        self.ensure_network(pod).await;
        let Some(pod_ip) = self.pod_ip() else {
            let message = self.sandbox_error.clone().unwrap_or_default();
            for slot in self.init.iter_mut().chain(self.containers.iter_mut()) {
                slot.set_waiting("ContainerCreating", message.clone());
            }
            return;
        };
        let pod_ip_text = pod_ip.to_string();
        let host_ip = self.rt.node_ip.to_string();
        let sources = self.rt.sources(&self.namespace);
        let inputs = VolumeInputs {
            client: &self.rt.client,
            pod,
            sources: &sources,
            node_root: &self.rt.node_root,
            pod_ip: Some(&pod_ip_text),
            host_ip: &host_ip,
        };
        self.volumes_wait = self.volumes.sync(&inputs).await.err();
        let Some(locations) = self.volumes.locations().cloned() else {
            let wait = self.volumes_wait.clone().unwrap_or(VolumesNotReady {
                reason: "ContainerCreating",
                message: String::new(),
            });
            for slot in self.init.iter_mut().chain(self.containers.iter_mut()) {
                slot.set_waiting(wait.reason, wait.message.clone());
            }
            return;
        };
        let spec = pod.spec.as_ref();
        let hostname = if self.host_network {
            self.rt.node_name.clone()
        } else {
            spec.and_then(|s| s.hostname.clone())
                .unwrap_or_else(|| self.name.clone())
        };
        let grace = termination_grace(pod);
        let cx = StartContext {
            rt: &self.rt,
            pod,
            netns: self.network.as_ref().map(|n| netns_path(&n.netns)),
            pod_ip,
            hostname,
            locations: &locations,
            restart_policy: spec
                .and_then(|s| s.restart_policy.as_deref())
                .unwrap_or("Always"),
            grace,
        };
        for slot in &mut self.init {
            if slot.finished
                && matches!(&slot.view.state, RunState::Terminated(t) if t.exit_code == 0)
            {
                continue;
            }
            step(slot, &cx);
            return;
        }
        for slot in &mut self.containers {
            step(slot, &cx);
        }
    }

    fn view(&self, pod: &Pod) -> PodView {
        let init: Vec<ContainerView> = self.init.iter().map(|s| s.view.clone()).collect();
        let containers: Vec<ContainerView> =
            self.containers.iter().map(|s| s.view.clone()).collect();
        let restart_policy = pod
            .spec
            .as_ref()
            .and_then(|s| s.restart_policy.as_deref())
            .unwrap_or("Always");
        let phase = self
            .terminal
            .unwrap_or_else(|| status::phase(restart_policy, &init, &containers));
        PodView {
            phase,
            host_ip: self.rt.node_ip.to_string(),
            pod_ip: self.pod_ip().map(|ip| ip.to_string()),
            start_time: self.start_time,
            sandbox_ready: self.pod_ip().is_some(),
            init,
            containers,
            readiness_gates: pod
                .spec
                .as_ref()
                .and_then(|s| s.readiness_gates.as_ref())
                .map(|g| g.iter().map(|g| g.condition_type.clone()).collect())
                .unwrap_or_default(),
        }
    }

    async fn write_status(&mut self, pod: &Pod) {
        let view = self.view(pod);
        if view.phase.is_terminal() && self.terminal.is_none() {
            info!(phase = view.phase.as_str(), "pod finished");
            self.terminal = Some(view.phase);
        }
        let observed = pod
            .status
            .as_ref()
            .and_then(|s| s.conditions.clone())
            .unwrap_or_default();
        let mut previous: Vec<PodCondition> = self
            .conditions
            .iter()
            .filter(|c| OWNED_CONDITIONS.contains(&c.type_.as_str()))
            .cloned()
            .collect();
        previous.extend(
            observed
                .into_iter()
                .filter(|c| !OWNED_CONDITIONS.contains(&c.type_.as_str())),
        );
        let status = status::build(&view, &previous, now_ts());
        if self.last_status.as_ref() == Some(&status) {
            return;
        }
        if let Some((refused, at)) = &self.refused {
            if refused == &status && at.elapsed() < REFUSED_RETRY {
                return;
            }
        }
        let api: Api<Pod> = Api::namespaced(self.rt.client.clone(), &self.namespace);
        let patch = serde_json::json!({ "status": status });
        let params = PatchParams {
            field_manager: Some(FIELD_MANAGER.to_owned()),
            ..Default::default()
        };
        match api
            .patch_status(&self.name, &params, &Patch::Merge(&patch))
            .await
        {
            Ok(_) => {
                self.conditions = status.conditions.clone().unwrap_or_default();
                self.last_status = Some(status);
            }
            Err(kube::Error::Api(refusal)) if refusal.code == 422 => {
                warn!(error = %refusal, "status refused; not retrying it for {REFUSED_RETRY:?}");
                self.refused = Some((status, Instant::now()));
            }
            Err(error) => warn!(%error, "status patch failed; retrying next pass"),
        }
    }

    fn publish_logs(&self) {
        let files: BTreeMap<String, LogFiles> = self
            .init
            .iter()
            .chain(self.containers.iter())
            .map(|s| (s.spec.name.clone(), s.log_files()))
            .collect();
        self.rt
            .publish_logs(&self.namespace, &self.name, Some(files));
    }

    /// Stops every container: SIGTERM, up to `grace`, SIGKILL, reap (bounded).
    async fn stop_all(&mut self, grace: Duration) {
        for slot in self.init.iter_mut().chain(self.containers.iter_mut()) {
            if let Some(pull) = slot.pull.take() {
                pull.abort();
            }
            if let Some(run) = slot.run.as_mut() {
                run.stop(grace);
            }
        }
        let deadline = Instant::now() + grace;
        for slot in self.init.iter_mut().chain(self.containers.iter_mut()) {
            let Some(mut run) = slot.run.take() else {
                continue;
            };
            let remaining = deadline.saturating_duration_since(Instant::now());
            if tokio::time::timeout(remaining, run.child.wait())
                .await
                .is_err()
            {
                signal_group(run.pid, Signal::SIGKILL);
                let _ = tokio::time::timeout(Duration::from_secs(5), run.child.wait()).await;
            }
            // Leftovers of the group (children that outlived the leader).
            signal_group(run.pid, Signal::SIGKILL);
            slot.view.ready = false;
        }
    }

    /// Stops the pod and removes its network namespace and (if `remove_files`) its directory.
    async fn tear_down(&mut self, grace: Duration, remove_files: bool) {
        self.stop_all(grace).await;
        if let Some(network) = self.network.take() {
            if let Err(error) = netns::remove(&network).await {
                warn!(%error, "pod network removal failed");
            }
        }
        if let Some(ip) = self.ip.take() {
            self.rt.release_ip(ip);
        }
        if remove_files {
            if let Err(error) = std::fs::remove_dir_all(&self.pod_dir) {
                if error.kind() != std::io::ErrorKind::NotFound {
                    warn!(%error, dir = %self.pod_dir.display(), "pod directory removal failed");
                }
            }
            self.rt.publish_logs(&self.namespace, &self.name, None);
        }
    }

    async fn delete_from_api(&self) -> Result<(), TearDownPodError> {
        let api: Api<Pod> = Api::namespaced(self.rt.client.clone(), &self.namespace);
        let params = DeleteParams {
            grace_period_seconds: Some(0),
            preconditions: Some(Preconditions {
                uid: Some(self.uid.clone()),
                resource_version: None,
            }),
            ..Default::default()
        };
        match api.delete(&self.name, &params).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(status)) if status.code == 404 || status.code == 409 => Ok(()),
            Err(source) => Err(TearDownPodError::Delete {
                namespace: self.namespace.clone(),
                name: self.name.clone(),
                source,
            }),
        }
    }
}

fn termination_grace(pod: &Pod) -> Duration {
    Duration::from_secs(
        pod.spec
            .as_ref()
            .and_then(|s| s.termination_grace_period_seconds)
            .and_then(|g| u64::try_from(g).ok())
            .unwrap_or(30),
    )
    .min(MAX_GRACE)
}

fn deletion_grace(pod: &Pod) -> Duration {
    Duration::from_secs(
        pod.metadata
            .deletion_grace_period_seconds
            .and_then(|g| u64::try_from(g).ok())
            .unwrap_or(30),
    )
    .min(MAX_GRACE)
}

/// Runs the worker of one pod until it is deleted, vanishes, or `cancel` fires.
pub async fn run(
    rt: Arc<NodeRuntime>,
    mut pod_rx: watch::Receiver<Option<Arc<Pod>>>,
    cancel: CancellationToken,
) {
    let Some(first) = pod_rx.borrow_and_update().clone() else {
        return;
    };
    let span = tracing::info_span!(
        "pod",
        pod = %format!(
            "{}/{}",
            first.metadata.namespace.as_deref().unwrap_or_default(),
            first.metadata.name.as_deref().unwrap_or_default()
        )
    );
    run_pod(rt, pod_rx, first, cancel).instrument(span).await;
}

async fn run_pod(
    rt: Arc<NodeRuntime>,
    mut pod_rx: watch::Receiver<Option<Arc<Pod>>>,
    first: Arc<Pod>,
    cancel: CancellationToken,
) {
    let mut worker = PodWorker::new(rt, &first);
    let mut ticks = tokio::time::interval(TICK);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            _ = cancel.cancelled() => {
                let grace = SHUTDOWN_GRACE.min(termination_grace(&first));
                worker.tear_down(grace, false).await;
                return;
            }
            changed = pod_rx.changed() => {
                if changed.is_err() {
                    worker.tear_down(VANISHED_GRACE, true).await;
                    return;
                }
            }
            _ = ticks.tick() => {}
        }
        let current = pod_rx.borrow_and_update().clone();
        let Some(pod) = current else {
            info!("pod vanished from the API; tearing it down");
            worker.tear_down(VANISHED_GRACE, true).await;
            return;
        };
        if pod.metadata.deletion_timestamp.is_some() {
            info!("pod deleted; stopping it");
            worker.tear_down(deletion_grace(&pod), true).await;
            if let Err(error) = worker.delete_from_api().await {
                warn!(%error, "final delete failed; a new worker retries");
            }
            return;
        }
        worker.sync(&pod).await;
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    #[test]
    fn a_failed_containers_message_is_the_tail_of_its_log() {
        let log: String = (0..100).map(|i| format!("line {i}\n")).collect();
        let message = termination_message_from_log(log.as_bytes());
        assert!(message.starts_with("line 20\n"), "{message}");
        assert!(message.ends_with("line 99"), "{message}");
        let long = "x".repeat(5000);
        assert_eq!(termination_message_from_log(long.as_bytes()).len(), 2048);
        assert_eq!(termination_message_from_log(b""), "");
    }
}
