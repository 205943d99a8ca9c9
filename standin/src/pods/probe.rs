//! Container probes: `httpGet`, `tcpSocket` and `exec` checks, their timing and thresholds, run
//! as one task per probe of a running container.
//!
//! Deviations (documented in the README): `periodSeconds` is capped at [`MAX_PERIOD`] so tests do
//! not wait; `grpc` probes are approximated by a TCP connect to their port; HTTPS is not
//! verified (as the kubelet does) and redirects are not followed (a 3xx is a success, as for the
//! kubelet when the redirect goes to another host).
//!
//! Invariants: a probe task belongs to one run of one container and is aborted when the run
//! ends; every check has its `timeoutSeconds` deadline; the published result changes only when a
//! threshold is crossed (`successThreshold` consecutive successes, `failureThreshold`
//! consecutive failures); liveness and startup tasks stop after publishing a failure (the
//! container gets restarted), a startup task stops after its success.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use k8s_openapi::api::core::v1::{ContainerPort, Probe};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::launch::{exec_probe_command_line, Identity};
use crate::host_command;

/// The longest period between two checks (`periodSeconds` is capped to it).
pub const MAX_PERIOD: Duration = Duration::from_secs(2);

/// Which probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbeKind {
    /// `startupProbe`.
    Startup,
    /// `readinessProbe`.
    Readiness,
    /// `livenessProbe`.
    Liveness,
}

/// The threshold-crossed state a probe publishes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbeResult {
    /// No threshold crossed yet.
    Unknown,
    /// `successThreshold` consecutive successes.
    Success,
    /// `failureThreshold` consecutive failures.
    Failure,
}

/// Timing and thresholds of a probe, with the Kubernetes defaults and the period cap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    /// `initialDelaySeconds`.
    pub initial_delay: Duration,
    /// `periodSeconds` (default 10), capped at [`MAX_PERIOD`].
    pub period: Duration,
    /// `timeoutSeconds` (default 1).
    pub timeout: Duration,
    /// `successThreshold` (default 1; always 1 for liveness and startup).
    pub success_threshold: u32,
    /// `failureThreshold` (default 3).
    pub failure_threshold: u32,
}

fn seconds(value: Option<i32>, default: u64) -> Duration {
    Duration::from_secs(value.and_then(|v| u64::try_from(v).ok()).unwrap_or(default))
}

fn count(value: Option<i32>, default: u32) -> u32 {
    value
        .and_then(|v| u32::try_from(v).ok())
        .filter(|v| *v > 0)
        .unwrap_or(default)
}

/// The timing of `probe` (pure).
pub fn timing(probe: &Probe, kind: ProbeKind) -> Timing {
    Timing {
        initial_delay: seconds(probe.initial_delay_seconds, 0),
        period: seconds(probe.period_seconds, 10)
            .min(MAX_PERIOD)
            .max(Duration::from_millis(100)),
        timeout: seconds(probe.timeout_seconds, 1).max(Duration::from_secs(1)),
        success_threshold: if kind == ProbeKind::Readiness {
            count(probe.success_threshold, 1)
        } else {
            1
        },
        failure_threshold: count(probe.failure_threshold, 3),
    }
}

/// Counts consecutive results and tells when a threshold is crossed (pure).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tracker {
    successes: u32,
    failures: u32,
    result: ProbeResult,
}

impl Default for Tracker {
    fn default() -> Self {
        Self {
            successes: 0,
            failures: 0,
            result: ProbeResult::Unknown,
        }
    }
}

impl Tracker {
    /// Records one check; returns the new result when it changed.
    pub fn record(&mut self, ok: bool, timing: &Timing) -> Option<ProbeResult> {
        if ok {
            self.successes = self.successes.saturating_add(1);
            self.failures = 0;
        } else {
            self.failures = self.failures.saturating_add(1);
            self.successes = 0;
        }
        let next = if self.successes >= timing.success_threshold {
            ProbeResult::Success
        } else if self.failures >= timing.failure_threshold {
            ProbeResult::Failure
        } else {
            self.result
        };
        (next != self.result).then(|| {
            self.result = next;
            next
        })
    }
}

/// Why a port cannot be resolved.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ResolvePortError {
    /// A named port the container does not declare.
    #[error("port {0:?} is not a named port of the container")]
    UnknownName(String),
    /// Out of range.
    #[error("port {0} is out of range")]
    OutOfRange(i32),
}

/// A probe port: a number, or a name looked up in the container's ports (pure).
pub fn resolve_port(port: &IntOrString, ports: &[ContainerPort]) -> Result<u16, ResolvePortError> {
    let number = match port {
        IntOrString::Int(n) => *n,
        IntOrString::String(name) => match name.parse::<i32>() {
            Ok(n) => n,
            Err(_) => ports
                .iter()
                .find(|p| p.name.as_deref() == Some(name.as_str()))
                .map(|p| p.container_port)
                .ok_or_else(|| ResolvePortError::UnknownName(name.clone()))?,
        },
    };
    u16::try_from(number)
        .ok()
        .filter(|n| *n > 0)
        .ok_or(ResolvePortError::OutOfRange(number))
}

/// What a probe checks against.
#[derive(Debug, Clone)]
pub struct ProbeTarget {
    /// The pod IP.
    pub pod_ip: IpAddr,
    /// The container's declared ports.
    pub ports: Vec<ContainerPort>,
    /// The container's main process (for `exec`).
    pub pid: Option<u32>,
    /// Its identity (for `exec`).
    pub identity: Identity,
    /// Its environment (for `exec`).
    pub env: Vec<(String, String)>,
}

/// One check of `probe`: `Ok` on success, the reason otherwise.
pub async fn check(
    probe: &Probe,
    target: &ProbeTarget,
    http: &reqwest::Client,
    timeout: Duration,
) -> Result<(), String> {
    if let Some(get) = &probe.http_get {
        let port = resolve_port(&get.port, &target.ports).map_err(|e| e.to_string())?;
        let host = get
            .host
            .clone()
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| target.pod_ip.to_string());
        let scheme = get.scheme.as_deref().unwrap_or("HTTP").to_ascii_lowercase();
        let path = get.path.clone().unwrap_or_else(|| "/".to_owned());
        let path = if path.starts_with('/') {
            path
        } else {
            format!("/{path}")
        };
        let url = format!("{scheme}://{host}:{port}{path}");
        let mut request = http.get(&url).timeout(timeout);
        for header in get.http_headers.iter().flatten() {
            request = request.header(&header.name, &header.value);
        }
        let response = request
            .send()
            .await
            .map_err(|e| format!("GET {url}: {e}"))?;
        let status = response.status().as_u16();
        return if (200..400).contains(&status) {
            Ok(())
        } else {
            Err(format!("GET {url}: HTTP {status}"))
        };
    }
    let tcp_port = if let Some(tcp) = &probe.tcp_socket {
        Some(resolve_port(&tcp.port, &target.ports).map_err(|e| e.to_string())?)
    } else {
        probe
            .grpc
            .as_ref()
            .map(|g| {
                u16::try_from(g.port).map_err(|_| format!("grpc port {} out of range", g.port))
            })
            .transpose()?
    };
    if let Some(port) = tcp_port {
        let addr = SocketAddr::new(target.pod_ip, port);
        return match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(addr)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(format!("dial {addr}: {e}")),
            Err(_) => Err(format!("dial {addr}: timeout")),
        };
    }
    if let Some(exec) = &probe.exec {
        let pid = target.pid.ok_or("the container has no process")?;
        let line = exec_probe_command_line(
            pid,
            &target.identity,
            exec.command.as_deref().unwrap_or_default(),
        );
        let (program, args) = line.split_first().ok_or("empty exec probe")?;
        return run_exec(program, args, &target.env, timeout).await;
    }
    Err("probe has no handler".to_owned())
}

async fn run_exec(
    program: &str,
    args: &[String],
    env: &[(String, String)],
    timeout: Duration,
) -> Result<(), String> {
    let child = tokio::process::Command::new(program)
        .args(args)
        .env_clear()
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("exec probe: {e}"))?;
    match tokio::time::timeout(timeout, child.wait_with_output()).await {
        Ok(Ok(output)) if output.status.success() => Ok(()),
        Ok(Ok(output)) => Err(format!(
            "exec probe failed ({}): {}",
            output.status,
            host_command::cut(&String::from_utf8_lossy(&output.stdout))
        )),
        Ok(Err(e)) => Err(format!("exec probe: {e}")),
        Err(_) => Err("exec probe timed out".to_owned()),
    }
}

/// A running probe: its latest result; the task is aborted on drop.
#[derive(Debug)]
pub struct RunningProbe {
    /// Latest threshold-crossed result.
    pub result: watch::Receiver<ProbeResult>,
    task: JoinHandle<()>,
}

impl Drop for RunningProbe {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Starts probing; the first check runs after `initialDelaySeconds`.
pub fn start(
    kind: ProbeKind,
    probe: Probe,
    target: ProbeTarget,
    http: reqwest::Client,
) -> RunningProbe {
    let (tx, rx) = watch::channel(ProbeResult::Unknown);
    let timing = timing(&probe, kind);
    let task = tokio::spawn(async move {
        tokio::time::sleep(timing.initial_delay).await;
        let mut tracker = Tracker::default();
        let mut ticks = tokio::time::interval(timing.period);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            let outcome = check(&probe, &target, &http, timing.timeout).await;
            if let Err(reason) = &outcome {
                tracing::debug!(?kind, %reason, "probe failed");
            }
            if let Some(result) = tracker.record(outcome.is_ok(), &timing) {
                let _ = tx.send(result);
                let done = matches!(
                    (kind, result),
                    (ProbeKind::Startup, ProbeResult::Success)
                        | (
                            ProbeKind::Startup | ProbeKind::Liveness,
                            ProbeResult::Failure
                        )
                );
                if done {
                    return;
                }
            }
            if tx.is_closed() {
                return;
            }
        }
    });
    RunningProbe { result: rx, task }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;

    #[test]
    fn timing_applies_defaults_and_caps_the_period() {
        let t = timing(&Probe::default(), ProbeKind::Readiness);
        assert_eq!(t.period, MAX_PERIOD);
        assert_eq!(t.timeout, Duration::from_secs(1));
        assert_eq!((t.success_threshold, t.failure_threshold), (1, 3));
        let probe = Probe {
            initial_delay_seconds: Some(5),
            period_seconds: Some(1),
            success_threshold: Some(2),
            failure_threshold: Some(6),
            timeout_seconds: Some(3),
            ..Default::default()
        };
        let t = timing(&probe, ProbeKind::Readiness);
        assert_eq!(t.initial_delay, Duration::from_secs(5));
        assert_eq!(t.period, Duration::from_secs(1));
        assert_eq!((t.success_threshold, t.failure_threshold), (2, 6));
        assert_eq!(timing(&probe, ProbeKind::Liveness).success_threshold, 1);
    }

    #[test]
    fn thresholds_need_consecutive_results() {
        let probe = Probe {
            success_threshold: Some(2),
            failure_threshold: Some(2),
            ..Default::default()
        };
        let t = timing(&probe, ProbeKind::Readiness);
        let mut tracker = Tracker::default();
        assert_eq!(tracker.record(true, &t), None);
        assert_eq!(tracker.record(true, &t), Some(ProbeResult::Success));
        assert_eq!(tracker.record(true, &t), None);
        assert_eq!(tracker.record(false, &t), None);
        assert_eq!(tracker.record(true, &t), None);
        assert_eq!(tracker.record(false, &t), None);
        assert_eq!(tracker.record(false, &t), Some(ProbeResult::Failure));
        assert_eq!(tracker.record(true, &t), None);
        assert_eq!(tracker.record(true, &t), Some(ProbeResult::Success));
    }

    #[test]
    fn ports_resolve_by_number_or_name() {
        let ports = [ContainerPort {
            name: Some("http".into()),
            container_port: 5000,
            ..Default::default()
        }];
        assert_eq!(resolve_port(&IntOrString::Int(8080), &ports), Ok(8080));
        assert_eq!(
            resolve_port(&IntOrString::String("http".into()), &ports),
            Ok(5000)
        );
        assert_eq!(
            resolve_port(&IntOrString::String("9090".into()), &ports),
            Ok(9090)
        );
        assert_eq!(
            resolve_port(&IntOrString::String("metrics".into()), &ports),
            Err(ResolvePortError::UnknownName("metrics".into()))
        );
        assert_eq!(
            resolve_port(&IntOrString::Int(0), &ports),
            Err(ResolvePortError::OutOfRange(0))
        );
    }

    #[tokio::test]
    async fn http_and_tcp_checks_reach_a_local_server() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            for _ in 0..2 {
                let (mut stream, _) = listener.accept().await.unwrap();
                let mut buf = [0u8; 1024];
                let n = stream.read(&mut buf).await.unwrap();
                let request = String::from_utf8_lossy(&buf[..n]).into_owned();
                let status = if request.starts_with("GET /readyz") {
                    "200 OK"
                } else {
                    "503 No"
                };
                let _ = stream
                    .write_all(
                        format!(
                            "HTTP/1.1 {status}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                        )
                        .as_bytes(),
                    )
                    .await;
            }
        });
        let http = reqwest::Client::builder().no_proxy().build().unwrap();
        let target = ProbeTarget {
            pod_ip: "127.0.0.1".parse().unwrap(),
            ports: vec![ContainerPort {
                name: Some("http".into()),
                container_port: i32::from(port),
                ..Default::default()
            }],
            pid: None,
            identity: Identity {
                uid: 0,
                gid: 0,
                groups: vec![],
                drop_all_capabilities: false,
            },
            env: vec![],
        };
        let get = |path: &str| Probe {
            http_get: Some(k8s_openapi::api::core::v1::HTTPGetAction {
                path: Some(path.into()),
                port: IntOrString::String("http".into()),
                ..Default::default()
            }),
            ..Default::default()
        };
        let timeout = Duration::from_secs(5);
        check(&get("/readyz"), &target, &http, timeout)
            .await
            .unwrap();
        let err = check(&get("/nope"), &target, &http, timeout)
            .await
            .unwrap_err();
        assert!(err.contains("503"), "{err}");
        server.await.unwrap();
        let tcp = Probe {
            tcp_socket: Some(k8s_openapi::api::core::v1::TCPSocketAction {
                port: IntOrString::Int(i32::from(port)),
                host: None,
            }),
            ..Default::default()
        };
        assert!(
            check(&tcp, &target, &http, timeout).await.is_err(),
            "listener is gone"
        );
    }
}
