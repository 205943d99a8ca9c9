//! Pod status from the runtime state of its containers (pure): phase, conditions and container
//! statuses, as the kubelet reports them.
//!
//! Invariants: the result depends only on the inputs (no clock reads: `now` is given), so equal
//! runtime states give equal statuses and the worker can skip writes of an unchanged status; a
//! condition's `lastTransitionTime` changes only when its status changes; conditions of types the
//! stand-in does not own (readiness gates, `DisruptionTarget`, …) are kept as observed.

use k8s_openapi::api::core::v1::{
    ContainerState, ContainerStateRunning, ContainerStateTerminated, ContainerStateWaiting,
    ContainerStatus, HostIP, PodCondition, PodIP, PodStatus,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;

/// How a container run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Termination {
    /// Exit code (128 + signal for a signal).
    pub exit_code: i32,
    /// The signal that ended it, if any.
    pub signal: Option<i32>,
    /// `Completed`, `Error`, `OOMKilled`…
    pub reason: String,
    /// Message (e.g. why it could not start).
    pub message: Option<String>,
    /// When it started (`None` if it never ran).
    pub started_at: Option<Timestamp>,
    /// When it ended.
    pub finished_at: Timestamp,
    /// Its container ID.
    pub container_id: Option<String>,
}

/// A container's current state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunState {
    /// Not running: creating, pulling, backing off, refused.
    Waiting {
        /// `ContainerCreating`, `ErrImagePull`, `CrashLoopBackOff`…
        reason: String,
        /// Details.
        message: Option<String>,
    },
    /// Running since `started_at`.
    Running {
        /// Start time.
        started_at: Timestamp,
    },
    /// Ended.
    Terminated(Termination),
}

/// What the status reports about one container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerView {
    /// Name.
    pub name: String,
    /// `image` as in the spec.
    pub image: String,
    /// Image ID (empty until known).
    pub image_id: String,
    /// State.
    pub state: RunState,
    /// How the previous run ended.
    pub last: Option<Termination>,
    /// Restarts so far.
    pub restart_count: i32,
    /// Passes its readiness probe (or has none and runs).
    pub ready: bool,
    /// Passed its startup probe (or has none) and runs.
    pub started: bool,
    /// ID of the current or last run.
    pub container_id: Option<String>,
}

/// `status.phase`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Not all containers started yet.
    Pending,
    /// Running or restarting.
    Running,
    /// All containers ended with 0 and will not restart.
    Succeeded,
    /// All containers ended, some failed, none restarts.
    Failed,
}

impl Phase {
    /// The API string.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "Pending",
            Self::Running => "Running",
            Self::Succeeded => "Succeeded",
            Self::Failed => "Failed",
        }
    }

    /// Succeeded or Failed.
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed)
    }
}

/// Whether every init container has completed successfully.
pub fn initialized(init: &[ContainerView]) -> bool {
    init.iter()
        .all(|c| matches!(&c.state, RunState::Terminated(t) if t.exit_code == 0))
}

/// The phase, by the kubelet's rules: init containers pending → Pending (a failed init
/// container with `restartPolicy: Never` → Failed); a waiting container that never ran →
/// Pending; any running → Running; all ended → Always restarts them (Running), all succeeded →
/// Succeeded, Never → Failed, OnFailure → Running.
pub fn phase(restart_policy: &str, init: &[ContainerView], containers: &[ContainerView]) -> Phase {
    if !initialized(init) {
        let init_failed = init
            .iter()
            .any(|c| matches!(&c.state, RunState::Terminated(t) if t.exit_code != 0));
        if init_failed && restart_policy == "Never" {
            return Phase::Failed;
        }
        return Phase::Pending;
    }
    let (mut running, mut waiting, mut stopped, mut succeeded) = (0, 0, 0, 0);
    for container in containers {
        match &container.state {
            RunState::Running { .. } => running += 1,
            RunState::Terminated(t) => {
                stopped += 1;
                if t.exit_code == 0 {
                    succeeded += 1;
                }
            }
            RunState::Waiting { .. } => {
                if container.last.is_some() {
                    stopped += 1;
                } else {
                    waiting += 1;
                }
            }
        }
    }
    if waiting > 0 {
        Phase::Pending
    } else if running > 0 {
        Phase::Running
    } else if stopped > 0 {
        if restart_policy == "Always" {
            Phase::Running
        } else if stopped == succeeded {
            Phase::Succeeded
        } else if restart_policy == "Never" {
            Phase::Failed
        } else {
            Phase::Running
        }
    } else {
        Phase::Pending
    }
}

/// Everything the status is built from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodView {
    /// Phase (see [`phase`]; a terminal phase is latched by the worker).
    pub phase: Phase,
    /// The node IP.
    pub host_ip: String,
    /// The pod IP, once the network is set up.
    pub pod_ip: Option<String>,
    /// When the stand-in first saw the pod.
    pub start_time: Timestamp,
    /// The network namespace exists.
    pub sandbox_ready: bool,
    /// Init containers, in spec order.
    pub init: Vec<ContainerView>,
    /// App containers, in spec order.
    pub containers: Vec<ContainerView>,
    /// Condition types of `spec.readinessGates`.
    pub readiness_gates: Vec<String>,
}

fn time(t: Timestamp) -> Time {
    Time(t)
}

fn termination(t: &Termination) -> ContainerStateTerminated {
    ContainerStateTerminated {
        container_id: t.container_id.clone(),
        exit_code: t.exit_code,
        finished_at: Some(time(t.finished_at)),
        message: t.message.clone(),
        reason: Some(t.reason.clone()),
        signal: t.signal,
        started_at: t.started_at.map(time),
    }
}

fn container_status(view: &ContainerView) -> ContainerStatus {
    let state = match &view.state {
        RunState::Waiting { reason, message } => ContainerState {
            waiting: Some(ContainerStateWaiting {
                reason: Some(reason.clone()),
                message: message.clone(),
            }),
            ..Default::default()
        },
        RunState::Running { started_at } => ContainerState {
            running: Some(ContainerStateRunning {
                started_at: Some(time(*started_at)),
            }),
            ..Default::default()
        },
        RunState::Terminated(t) => ContainerState {
            terminated: Some(termination(t)),
            ..Default::default()
        },
    };
    let last_state = ContainerState {
        terminated: view.last.as_ref().map(termination),
        ..Default::default()
    };
    ContainerStatus {
        name: view.name.clone(),
        image: view.image.clone(),
        image_id: view.image_id.clone(),
        container_id: view.container_id.clone(),
        ready: view.ready,
        started: Some(view.started),
        restart_count: view.restart_count,
        state: Some(state),
        last_state: Some(last_state),
        ..Default::default()
    }
}

fn names_where(views: &[ContainerView], pick: impl Fn(&ContainerView) -> bool) -> Vec<String> {
    views
        .iter()
        .filter(|v| pick(v))
        .map(|v| v.name.clone())
        .collect()
}

/// A condition, keeping the previous transition time when the status is unchanged.
fn condition(
    type_: &str,
    ok: bool,
    reason: Option<&str>,
    message: Option<String>,
    previous: &[PodCondition],
    now: Timestamp,
) -> PodCondition {
    let status = if ok { "True" } else { "False" };
    let last_transition_time = previous
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .and_then(|c| c.last_transition_time.clone())
        .or(Some(time(now)));
    PodCondition {
        type_: type_.to_owned(),
        status: status.to_owned(),
        reason: if ok { None } else { reason.map(str::to_owned) },
        message: if ok { None } else { message },
        last_transition_time,
        ..Default::default()
    }
}

/// Condition types this module owns.
pub const OWNED_CONDITIONS: [&str; 5] = [
    "PodScheduled",
    "PodReadyToStartContainers",
    "Initialized",
    "ContainersReady",
    "Ready",
];

/// The status of `view`; `previous` are the conditions last written or observed.
pub fn build(view: &PodView, previous: &[PodCondition], now: Timestamp) -> PodStatus {
    let terminal = view.phase.is_terminal();
    let not_initialized = names_where(
        &view.init,
        |c| !matches!(&c.state, RunState::Terminated(t) if t.exit_code == 0),
    );
    let unready = names_where(&view.containers, |c| !c.ready);
    let containers_ready = !terminal && unready.is_empty();
    let gates_ok = view.readiness_gates.iter().all(|gate| {
        previous
            .iter()
            .any(|c| &c.type_ == gate && c.status == "True")
    });
    let not_ready_reason = if terminal {
        "PodCompleted"
    } else {
        "ContainersNotReady"
    };
    let unready_message =
        (!terminal).then(|| format!("containers with unready status: [{}]", unready.join(" ")));
    let mut conditions = vec![
        condition(
            "PodReadyToStartContainers",
            view.sandbox_ready,
            None,
            None,
            previous,
            now,
        ),
        condition(
            "Initialized",
            not_initialized.is_empty(),
            Some("ContainersNotInitialized"),
            Some(format!(
                "containers with incomplete status: [{}]",
                not_initialized.join(" ")
            )),
            previous,
            now,
        ),
        condition(
            "Ready",
            containers_ready && gates_ok,
            Some(if containers_ready && !gates_ok {
                "ReadinessGatesNotReady"
            } else {
                not_ready_reason
            }),
            unready_message.clone(),
            previous,
            now,
        ),
        condition(
            "ContainersReady",
            containers_ready,
            Some(not_ready_reason),
            unready_message,
            previous,
            now,
        ),
        condition("PodScheduled", true, None, None, previous, now),
    ];
    for other in previous {
        if !OWNED_CONDITIONS.contains(&other.type_.as_str()) {
            conditions.push(other.clone());
        }
    }
    PodStatus {
        phase: Some(view.phase.as_str().to_owned()),
        host_ip: Some(view.host_ip.clone()),
        host_ips: Some(vec![HostIP {
            ip: view.host_ip.clone(),
        }]),
        pod_ip: view.pod_ip.clone(),
        pod_ips: view
            .pod_ip
            .as_ref()
            .map(|ip| vec![PodIP { ip: ip.clone() }]),
        start_time: Some(time(view.start_time)),
        conditions: Some(conditions),
        init_container_statuses: (!view.init.is_empty())
            .then(|| view.init.iter().map(container_status).collect()),
        container_statuses: Some(view.containers.iter().map(container_status).collect()),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;

    fn ts(secs: i64) -> Timestamp {
        Timestamp::from_second(1_700_000_000 + secs).unwrap()
    }

    fn ended(code: i32) -> Termination {
        Termination {
            exit_code: code,
            signal: None,
            reason: if code == 0 {
                "Completed".into()
            } else {
                "Error".into()
            },
            message: None,
            started_at: Some(ts(1)),
            finished_at: ts(2),
            container_id: None,
        }
    }

    fn view(name: &str, state: RunState) -> ContainerView {
        let running = matches!(state, RunState::Running { .. });
        ContainerView {
            name: name.into(),
            image: "busybox".into(),
            image_id: String::new(),
            state,
            last: None,
            restart_count: 0,
            ready: running,
            started: running,
            container_id: None,
        }
    }

    fn waiting(reason: &str) -> RunState {
        RunState::Waiting {
            reason: reason.into(),
            message: None,
        }
    }

    #[test]
    fn phases_follow_the_kubelet_rules() {
        let run = view("a", RunState::Running { started_at: ts(0) });
        let ok = view("a", RunState::Terminated(ended(0)));
        let bad = view("b", RunState::Terminated(ended(1)));
        let creating = view("a", waiting("ContainerCreating"));
        let backoff = ContainerView {
            last: Some(ended(1)),
            ..view("a", waiting("CrashLoopBackOff"))
        };

        assert_eq!(
            phase("Always", &[], std::slice::from_ref(&creating)),
            Phase::Pending
        );
        assert_eq!(
            phase("Always", &[], &[run.clone(), creating.clone()]),
            Phase::Pending
        );
        assert_eq!(
            phase("Always", &[], std::slice::from_ref(&run)),
            Phase::Running
        );
        assert_eq!(
            phase("Always", &[], std::slice::from_ref(&backoff)),
            Phase::Running
        );
        assert_eq!(
            phase("Always", &[], &[ok.clone(), bad.clone()]),
            Phase::Running
        );
        assert_eq!(
            phase("Never", &[], &[ok.clone(), bad.clone()]),
            Phase::Failed
        );
        assert_eq!(
            phase("Never", &[], std::slice::from_ref(&ok)),
            Phase::Succeeded
        );
        assert_eq!(
            phase("OnFailure", &[], std::slice::from_ref(&ok)),
            Phase::Succeeded
        );
        assert_eq!(
            phase("OnFailure", &[], &[ok.clone(), bad.clone()]),
            Phase::Running
        );
        assert_eq!(
            phase("Never", &[], &[ok.clone(), run.clone()]),
            Phase::Running
        );
    }

    #[test]
    fn init_containers_gate_the_phase() {
        let run = view("app", RunState::Running { started_at: ts(0) });
        let init_running = view("init", RunState::Running { started_at: ts(0) });
        let init_done = view("init", RunState::Terminated(ended(0)));
        let init_failed = view("init", RunState::Terminated(ended(2)));
        assert_eq!(
            phase(
                "Always",
                std::slice::from_ref(&init_running),
                std::slice::from_ref(&run)
            ),
            Phase::Pending
        );
        assert_eq!(
            phase(
                "Always",
                std::slice::from_ref(&init_done),
                std::slice::from_ref(&run)
            ),
            Phase::Running
        );
        assert_eq!(
            phase(
                "Never",
                std::slice::from_ref(&init_failed),
                std::slice::from_ref(&run)
            ),
            Phase::Failed
        );
        assert_eq!(
            phase(
                "Always",
                std::slice::from_ref(&init_failed),
                std::slice::from_ref(&run)
            ),
            Phase::Pending
        );
    }

    fn pod_view(containers: Vec<ContainerView>) -> PodView {
        PodView {
            phase: phase("Always", &[], &containers),
            host_ip: "10.240.0.11".into(),
            pod_ip: Some("10.240.1.2".into()),
            start_time: ts(0),
            sandbox_ready: true,
            init: vec![],
            containers,
            readiness_gates: vec![],
        }
    }

    fn find<'a>(status: &'a PodStatus, type_: &str) -> &'a PodCondition {
        status
            .conditions
            .as_ref()
            .unwrap()
            .iter()
            .find(|c| c.type_ == type_)
            .unwrap()
    }

    #[test]
    fn conditions_keep_their_transition_time_until_they_change() {
        let creating = pod_view(vec![view("a", waiting("ContainerCreating"))]);
        let first = build(&creating, &[], ts(10));
        assert_eq!(find(&first, "Ready").status, "False");
        assert_eq!(
            find(&first, "Ready").reason.as_deref(),
            Some("ContainersNotReady")
        );
        assert_eq!(
            find(&first, "Ready").message.as_deref(),
            Some("containers with unready status: [a]")
        );
        let again = build(&creating, first.conditions.as_ref().unwrap(), ts(20));
        assert_eq!(again, first, "same state, same status");

        let running = pod_view(vec![view("a", RunState::Running { started_at: ts(25) })]);
        let ready = build(&running, first.conditions.as_ref().unwrap(), ts(30));
        assert_eq!(find(&ready, "Ready").status, "True");
        assert_eq!(
            find(&ready, "Ready").last_transition_time,
            Some(Time(ts(30)))
        );
        assert_eq!(
            find(&ready, "PodScheduled").last_transition_time,
            Some(Time(ts(10)))
        );
        assert_eq!(ready.phase.as_deref(), Some("Running"));
        assert_eq!(ready.pod_ips.as_ref().unwrap()[0].ip, "10.240.1.2");
        let statuses = ready.container_statuses.as_ref().unwrap();
        assert!(statuses[0].ready);
        assert_eq!(
            statuses[0]
                .state
                .as_ref()
                .unwrap()
                .running
                .as_ref()
                .unwrap()
                .started_at,
            Some(Time(ts(25)))
        );
    }

    #[test]
    fn foreign_conditions_are_kept_and_readiness_gates_hold_ready_back() {
        let running = PodView {
            readiness_gates: vec!["example.com/gate".into()],
            ..pod_view(vec![view("a", RunState::Running { started_at: ts(0) })])
        };
        let gate = PodCondition {
            type_: "example.com/gate".into(),
            status: "False".into(),
            ..Default::default()
        };
        let status = build(&running, std::slice::from_ref(&gate), ts(1));
        assert_eq!(find(&status, "Ready").status, "False");
        assert_eq!(find(&status, "ContainersReady").status, "True");
        assert_eq!(find(&status, "example.com/gate"), &gate);
        let open = PodCondition {
            status: "True".into(),
            ..gate
        };
        let status = build(&running, &[open], ts(2));
        assert_eq!(find(&status, "Ready").status, "True");
    }

    #[test]
    fn terminal_pods_are_not_ready_with_reason_pod_completed() {
        let done = PodView {
            phase: Phase::Succeeded,
            ..pod_view(vec![view("a", RunState::Terminated(ended(0)))])
        };
        let status = build(&done, &[], ts(1));
        assert_eq!(
            find(&status, "Ready").reason.as_deref(),
            Some("PodCompleted")
        );
        let terminated = status.container_statuses.unwrap()[0]
            .state
            .clone()
            .unwrap()
            .terminated
            .unwrap();
        assert_eq!(terminated.reason.as_deref(), Some("Completed"));
        assert_eq!(terminated.exit_code, 0);
    }
}
