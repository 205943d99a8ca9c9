//! Benchmark of the operator against a real control plane (not a check of behaviour; ignored,
//! run on demand). It prints a table beside the previous figures measured against the Python fake
//! API server (kept in docs/testing.md):
//!
//! ```sh
//! cargo build --workspace --bins
//! cargo build --release -p cachalot-operator --bin cachalot-operator
//! CACHALOT_OPERATOR_BIN=$PWD/target/release/cachalot-operator \
//!   cargo nextest run -p cachalot-operator --test operator_bench --run-ignored ignored-only --no-capture
//! ```
//!
//! Set-up: a cluster with 3 fake nodes (kubelet stand-in, containerd, the cachalot image: real
//! registry and node agent pods) and 50 idle nodes (registered only, see
//! `ClusterOptions::idle_nodes`; `CACHALOT_BENCH_IDLE_NODES` changes the count); the chart's
//! ServiceAccount and RBAC (`helm template … | kubectl apply`); the real `cachalot-operator run`
//! binary (`CACHALOT_OPERATOR_BIN`, else the debug build), started inside the cluster's gateway
//! namespace with a token kubeconfig of that ServiceAccount, so it reaches pod IPs like an
//! in-cluster operator and its probes are real. Its `/metrics` is read through a unix-socket
//! forwarder; its memory from `/proc/<pid>/status`; its API requests from the audit log (by the
//! ServiceAccount's user name).
//!
//! Figures:
//! - (a) `kubectl apply` of a RegistryMirror → `Ready=True` (a registry pod serving and an agent
//!   on each of the 3 fake nodes configured), then delete → gone: median of 3 runs with the
//!   chart's requeue period (60 s), and of 5 runs with `--requeue-after=1s` (what the pods
//!   themselves take);
//! - (b) API requests per reconcile of a ready mirror when nothing changes, over 20 requeued
//!   passes (`--requeue-after=1s`): reads and writes (Lease renewals counted apart);
//! - (c) the operator's RSS idle, and with 200 RegistryMirrors whose agents target the 50 idle
//!   nodes (DaemonSet pods created by the controller manager, bound there, `Pending`); the
//!   registry pods of these mirrors request more CPU than a node has, so they stay unscheduled:
//!   no process runs for the 200 mirrors.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use cachalot_testkit::cluster::audit::AuditEvent;
use cachalot_testkit::cluster::{tools, Cluster, IDLE_NODE_TAINT};
use cachalot_testkit::process::LoggedChild;
use cachalot_testkit::wait::wait_for;
use common::cluster::{
    condition, condition_is_true, create_namespace, eventually_within, mirrors_api,
    prerequisites_or_skip, OperatorCluster, IMAGE,
};
use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use serde_json::{json, Value};

/// Where the operator runs and its ServiceAccount (the chart's, release `cachalot`).
const OPERATOR_NS: &str = "cachalot-system";
const SERVICE_ACCOUNT: &str = "cachalot";
/// Namespace of the benchmark's mirrors.
const NS: &str = "bench";
const REAL_NODES: u8 = 3;
const IDLE_NODES: u16 = 50;
const READY_RUNS_DEFAULT: usize = 3;
const READY_RUNS_FAST: usize = 5;
const IDLE_PASSES: u64 = 20;
const LOAD_MIRRORS: usize = 200;
const STEP: Duration = Duration::from_secs(180);
const LOAD_DEADLINE: Duration = Duration::from_secs(900);

/// The figures measured against the fake API server (docs/testing.md, before this benchmark).
mod previous {
    pub const APPLY_TO_READY: &str = "48–119 ms to first status (in-process, no pods)";
    pub const IDLE_REQUESTS: &str = "0 writes (controller-loop test); reads not counted";
    pub const RSS_IDLE: &str = "16.2 MiB";
    pub const RSS_LOADED: &str = "20.3–20.4 MiB (100 mirrors, no nodes)";
    pub const LOAD_TIME: &str = "2.7–4.8 s (99 more mirrors)";
    pub const RECONCILE_ALONE: &str = "19.6 ms";
    pub const RECONCILE_LOADED: &str = "0.29–0.51 s";
}

/// The operator binary as deployed (`cachalot-operator run`, leader election on), inside the
/// cluster's gateway namespace; killed on drop.
struct Operator {
    child: LoggedChild,
    metrics_socket: PathBuf,
    _forward: LoggedChild,
    user: String,
}

impl Operator {
    async fn start(cluster: &Cluster, instance: u16, requeue_after: &str) -> Self {
        let binary = tools::workspace_binary("cachalot-operator").unwrap();
        let standin = tools::workspace_binary("cachalot-standin").unwrap();
        let kubeconfig = cluster
            .service_account_kubeconfig(OPERATOR_NS, SERVICE_ACCOUNT, true)
            .await
            .unwrap();
        let net = cluster.network().net();
        // Ports inside the gateway namespace, where nothing else listens on 127.0.0.1.
        let listen = format!("127.0.0.1:{}", 18080 + instance);
        let name = format!("bench-operator-{instance}");
        let log = cluster.dir().join(format!("{name}.log"));
        let mut command = cluster.command_in(&net, &binary);
        command
            .args(["run", "--image", IMAGE, "--listen", &listen])
            .args(["--lease-name", &name, "--requeue-after", requeue_after])
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("KUBECONFIG", &kubeconfig)
            .env("POD_NAMESPACE", OPERATOR_NS)
            .env("POD_NAME", &name)
            .env("RUST_LOG", "info");
        let child = LoggedChild::spawn(&mut command, &log).unwrap();
        let metrics_socket = cluster.dir().join(format!("{name}-metrics.sock"));
        let mut forward = cluster.command_in(&net, &standin);
        forward
            .arg("forward")
            .arg("--listen")
            .arg(format!("unix:{}", metrics_socket.display()))
            .arg("--connect")
            .arg(format!("tcp:{listen}"));
        let forward =
            LoggedChild::spawn(&mut forward, &cluster.dir().join(format!("{name}-fwd.log")))
                .unwrap();
        let operator = Self {
            child,
            metrics_socket,
            _forward: forward,
            user: format!("system:serviceaccount:{OPERATOR_NS}:{SERVICE_ACCOUNT}"),
        };
        let leading = wait_for(STEP, Duration::from_millis(100), || async {
            let text = operator.metrics().await?;
            text.lines()
                .any(|l| l.trim_end() == "cachalot_operator_leader 1")
                .then_some(())
        })
        .await;
        assert!(
            leading.is_ok(),
            "the operator leads and serves /metrics; its log:\n{}",
            operator.child.log_tail()
        );
        operator
    }

    /// `GET /metrics` (HTTP/1.0 through the unix-socket forwarder).
    async fn metrics(&self) -> Option<String> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::net::UnixStream::connect(&self.metrics_socket)
            .await
            .ok()?;
        stream
            .write_all(b"GET /metrics HTTP/1.0\r\nHost: operator\r\n\r\n")
            .await
            .ok()?;
        let mut body = String::new();
        stream.read_to_string(&mut body).await.ok()?;
        body.contains("cachalot_operator_").then_some(body)
    }

    async fn value(&self, name: &str) -> f64 {
        let text = self.metrics().await.unwrap_or_default();
        metric(&text, name).unwrap_or(0.0)
    }

    async fn reconciliations(&self) -> u64 {
        // A counter read as f64 from text: exact for any count this benchmark reaches.
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let n = self.value("cachalot_operator_reconciliations_total").await as u64;
        n
    }

    /// (sum, count) of the reconcile duration histogram.
    async fn reconcile_sum_count(&self) -> (f64, f64) {
        (
            self.value("cachalot_operator_reconcile_duration_seconds_sum")
                .await,
            self.value("cachalot_operator_reconcile_duration_seconds_count")
                .await,
        )
    }

    /// `VmRSS` and `VmHWM` (peak) in MiB.
    fn memory_mib(&self) -> (f64, f64) {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        let kib = |key: &str| {
            status
                .lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        (kib("VmRSS:") / 1024.0, kib("VmHWM:") / 1024.0)
    }

    /// Whether the operator has listed every kind it watches (its caches are filled).
    fn has_listed_everything(&self, events: &[AuditEvent]) -> bool {
        let listed: Vec<&str> = events
            .iter()
            .filter(|e| e.user.username == self.user && e.verb == "list")
            .filter_map(|e| Some(e.object_ref.as_ref()?.resource.as_str()))
            .collect();
        [
            "registrymirrors",
            "deployments",
            "statefulsets",
            "daemonsets",
            "services",
            "configmaps",
            "poddisruptionbudgets",
        ]
        .iter()
        .all(|kind| listed.contains(kind))
    }
}

/// The value of the sample `name` (no labels) in Prometheus text.
fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let mut fields = l.split_whitespace();
        (fields.next()? == name).then(|| fields.next()?.parse().ok())?
    })
}

fn run_ok(command: &mut std::process::Command, stdin: Option<&[u8]>) -> String {
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    if let Some(input) = stdin {
        child.stdin.take().unwrap().write_all(input).unwrap();
    } else {
        drop(child.stdin.take());
    }
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{command:?}: {}{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The chart's ServiceAccount, ClusterRole, leader-election Role and bindings (release
/// `cachalot` in `cachalot-system`).
fn install_chart_rbac(cluster: &Cluster) {
    let chart = tools::repo_root().join("charts/cachalot");
    let rendered = run_ok(
        cluster
            .helm()
            .unwrap()
            .args(["template", "cachalot"])
            .arg(&chart)
            .args(["--namespace", OPERATOR_NS])
            .args(["--show-only", "templates/serviceaccount.yaml"])
            .args(["--show-only", "templates/rbac.yaml"]),
        None,
    );
    run_ok(
        cluster.kubectl().unwrap().args(["apply", "-f", "-"]),
        Some(rendered.as_bytes()),
    );
}

fn median(mut values: Vec<Duration>) -> Duration {
    values.sort();
    values.get(values.len() / 2).copied().unwrap_or_default()
}

fn seconds(d: Duration) -> String {
    format!("{:.1} s", d.as_secs_f64())
}

/// A mirror for docker.io on the fake nodes (the idle nodes' taint is not tolerated).
fn ready_mirror(name: &str) -> Value {
    json!({"apiVersion": "cachalot.dev/v1alpha1", "kind": "RegistryMirror",
           "metadata": {"name": name, "namespace": NS},
           "spec": {"registries": [{"name": "docker.io"}]}})
}

/// A mirror of its own registry whose agents target the idle nodes and whose registry pod cannot
/// be scheduled (it requests more CPU than any node has).
fn load_mirror(i: usize) -> Value {
    let (key, value) = IDLE_NODE_TAINT;
    json!({"apiVersion": "cachalot.dev/v1alpha1", "kind": "RegistryMirror",
           "metadata": {"name": format!("load-{i}"), "namespace": NS},
           "spec": {"registries": [{"name": format!("registry-{i}.bench.test")}],
                    "resources": {"requests": {"cpu": "1000", "memory": "64Mi"}},
                    "nodes": {"nodeSelector": {key: value},
                              "tolerations": [{"key": key, "operator": "Equal", "value": value,
                                               "effect": "NoSchedule"}]}}})
}

struct ReadyRun {
    first_status: Duration,
    proxy_available: Duration,
    nodes_configured: Duration,
    ready: Duration,
    gone: Duration,
    /// The last `NodesConfigured` reason and message before it turned `True`.
    nodes_waiting_reason: String,
    nodes_waiting: String,
}

/// What one run saw while polling: when each condition first held, and the last message of
/// `NodesConfigured` before it did.
#[derive(Default)]
struct Seen {
    first_status: Option<Duration>,
    proxy_available: Option<Duration>,
    nodes_configured: Option<Duration>,
    nodes_waiting_reason: String,
    nodes_waiting: String,
}

/// Medians of `runs` runs of [`apply_to_ready`], as (Ready, first status, delete → gone, the
/// last `NodesConfigured` reason before it turned `True`).
async fn ready_runs(
    env: &OperatorCluster,
    label: &str,
    runs: usize,
) -> (Duration, Duration, Duration, String) {
    let mut all = Vec::new();
    for run in 0..runs {
        let r = apply_to_ready(env, &format!("ready-{label}-{run}")).await;
        eprintln!(
            "bench: {label} run {run}: first status {}, ProxyAvailable {}, NodesConfigured {} \
             (before: {}: {}), Ready {}, delete → gone {}",
            seconds(r.first_status),
            seconds(r.proxy_available),
            seconds(r.nodes_configured),
            r.nodes_waiting_reason,
            r.nodes_waiting,
            seconds(r.ready),
            seconds(r.gone)
        );
        all.push(r);
    }
    let waiting = all
        .last()
        .map(|r| r.nodes_waiting_reason.clone())
        .unwrap_or_default();
    (
        median(all.iter().map(|r| r.ready).collect()),
        median(all.iter().map(|r| r.first_status).collect()),
        median(all.iter().map(|r| r.gone).collect()),
        waiting,
    )
}

/// (a): `kubectl apply` → first status → `Ready=True`, then `kubectl delete` → gone.
async fn apply_to_ready(env: &OperatorCluster, name: &str) -> ReadyRun {
    let mirrors = mirrors_api(&env.client, NS);
    let name = name.to_owned();
    let manifest = serde_json::to_vec(&ready_mirror(&name)).unwrap();
    let started = Instant::now();
    run_ok(
        env.cluster.kubectl().unwrap().args(["apply", "-f", "-"]),
        Some(&manifest),
    );
    let seen = std::sync::Mutex::new(Seen::default());
    let ready = wait_for(STEP, Duration::from_millis(50), || {
        let mirrors = mirrors.clone();
        let name = name.clone();
        let seen = &seen;
        async move {
            let m = mirrors.get(&name).await.ok()?;
            let now = started.elapsed();
            let mut seen = seen.lock().unwrap();
            if m.data["status"]["observedGeneration"] == 1 {
                seen.first_status.get_or_insert(now);
            }
            if condition_is_true(&m, "ProxyAvailable") {
                seen.proxy_available.get_or_insert(now);
            }
            if condition_is_true(&m, "NodesConfigured") {
                seen.nodes_configured.get_or_insert(now);
            } else if let Some(c) = condition(&m, "NodesConfigured") {
                seen.nodes_waiting_reason = c["reason"].as_str().unwrap_or_default().to_owned();
                seen.nodes_waiting = c["message"].as_str().unwrap_or_default().to_owned();
            }
            condition_is_true(&m, "Ready").then_some(now)
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{name} Ready=True within {STEP:?}"));
    let deleted = Instant::now();
    run_ok(
        env.cluster.kubectl().unwrap().args([
            "delete",
            "registrymirror",
            &name,
            "-n",
            NS,
            "--wait=false",
        ]),
        None,
    );
    eventually_within(&format!("{name} to be gone"), STEP, || async {
        matches!(mirrors.get_opt(&name).await, Ok(None)).then_some(())
    })
    .await;
    let seen = seen.into_inner().unwrap();
    ReadyRun {
        first_status: seen.first_status.unwrap_or(ready),
        proxy_available: seen.proxy_available.unwrap_or(ready),
        nodes_configured: seen.nodes_configured.unwrap_or(ready),
        ready,
        gone: deleted.elapsed(),
        nodes_waiting_reason: seen.nodes_waiting_reason,
        nodes_waiting: seen.nodes_waiting,
    }
}

/// (b) requests of the operator's user in a window: (reads by verb and resource, writes, and
/// apart from both, the leader elector's Lease requests).
fn count_requests(events: &[AuditEvent], user: &str) -> (BTreeMap<String, u64>, Vec<String>, u64) {
    let mut reads: BTreeMap<String, u64> = BTreeMap::new();
    let mut writes = Vec::new();
    let mut lease_requests = 0;
    for e in events.iter().filter(|e| e.user.username == user) {
        let resource = e
            .object_ref
            .as_ref()
            .map(|o| match &o.subresource {
                Some(sub) => format!("{}/{sub}", o.resource),
                None => o.resource.clone(),
            })
            .unwrap_or_default();
        if resource == "leases" {
            // The leader elector's, not the reconciler's.
            lease_requests += 1;
        } else if !e.is_write() {
            *reads.entry(format!("{} {resource}", e.verb)).or_default() += 1;
        } else {
            writes.push(format!("{} {}", e.verb, e.request_uri));
        }
    }
    (reads, writes, lease_requests)
}

/// How many pods exist in `NS` (one list of one item: its `remainingItemCount`).
async fn pod_count(client: &kube::Client) -> u64 {
    let pods: Api<Pod> = Api::namespaced(client.clone(), NS);
    let Ok(page) = pods.list_metadata(&ListParams::default().limit(1)).await else {
        return 0;
    };
    let remaining = page
        .metadata
        .remaining_item_count
        .and_then(|n| u64::try_from(n).ok())
        .unwrap_or(0);
    u64::try_from(page.items.len()).unwrap_or(0) + remaining
}

/// The machine's 1, 5 and 15 minute load averages (other work shares the cores).
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "benchmark: the operator against a real API server; run on demand"]
#[allow(clippy::too_many_lines)] // one linear benchmark script reads best in one place
async fn measure_the_operator_against_a_real_api_server() {
    if !prerequisites_or_skip("measure_the_operator_against_a_real_api_server") {
        return;
    }
    let idle_nodes: u16 = env_or("CACHALOT_BENCH_IDLE_NODES", IDLE_NODES);
    let load_mirrors: usize = env_or("CACHALOT_BENCH_MIRRORS", LOAD_MIRRORS);
    let started = Instant::now();
    let env = OperatorCluster::start_with(REAL_NODES, idle_nodes, NS, |options| {
        // The DaemonSet controller makes up to 200 × 50 pods; at the default 20 requests/s
        // that alone would take 10 minutes.
        options.controller_manager_args = vec![
            "--kube-api-qps=300".to_owned(),
            "--kube-api-burst=600".to_owned(),
        ];
    })
    .await;
    let cluster_started = started.elapsed();
    create_namespace(&env.client, OPERATOR_NS).await;
    install_chart_rbac(&env.cluster);
    let binary = tools::workspace_binary("cachalot-operator").unwrap();
    eprintln!(
        "bench: cluster with {REAL_NODES} fake nodes and {idle_nodes} idle nodes in {}; operator {}; \
         load average {}",
        seconds(cluster_started),
        binary.display(),
        load_average()
    );

    // The operator with the chart's defaults (requeue every 60 s).
    let operator = Operator::start(&env.cluster, 1, "60s").await;
    eventually_within(
        "the operator to list every kind it watches",
        STEP,
        || async {
            operator
                .has_listed_everything(&env.cluster.audit_events())
                .then_some(())
        },
    )
    .await;
    let (rss_idle, _) = operator.memory_mib();

    // (a) apply → Ready on the 3 fake nodes, with the default requeue period.
    let slow = ready_runs(&env, "default", READY_RUNS_DEFAULT).await;
    let (alone_sum, alone_count) = operator.reconcile_sum_count().await;
    drop(operator);

    // (a') the same with a requeue every second, then (b) requests per idle pass.
    let operator = Operator::start(&env.cluster, 2, "1s").await;
    let fast = ready_runs(&env, "fast", READY_RUNS_FAST).await;

    let mirrors = mirrors_api(&env.client, NS);
    let manifest = ready_mirror("idle");
    mirrors
        .patch(
            "idle",
            &PatchParams::apply("bench").force(),
            &Patch::Apply(&manifest),
        )
        .await
        .unwrap();
    eventually_within("the idle mirror Ready=True", STEP, || async {
        let m = mirrors.get("idle").await.ok()?;
        condition_is_true(&m, "Ready").then_some(())
    })
    .await;
    let settled = operator.reconciliations().await + 3;
    eventually_within("three more passes", STEP, || async {
        (operator.reconciliations().await >= settled).then_some(())
    })
    .await;
    let before_events = env.cluster.audit_events().len();
    let before_passes = operator.reconciliations().await;
    eventually_within("the idle passes", STEP, || async {
        (operator.reconciliations().await >= before_passes + IDLE_PASSES).then_some(())
    })
    .await;
    let passes = operator.reconciliations().await - before_passes;
    let window: Vec<AuditEvent> = env
        .cluster
        .audit_events()
        .into_iter()
        .skip(before_events)
        .collect();
    let (reads, writes, lease_requests) = count_requests(&window, &operator.user);
    #[allow(clippy::cast_precision_loss)] // small counts
    let per_pass = |n: u64| n as f64 / passes as f64;
    let reads_total: u64 = reads.values().sum();
    let read_detail: Vec<String> = reads
        .iter()
        .map(|(k, n)| format!("{k} {:.1}", per_pass(*n)))
        .collect();
    mirrors
        .delete("idle", &DeleteParams::default())
        .await
        .unwrap();
    eventually_within("the idle mirror to be gone", STEP, || async {
        matches!(mirrors.get_opt("idle").await, Ok(None)).then_some(())
    })
    .await;
    drop(operator);

    // (c) memory: idle, then 200 mirrors whose agents target the idle nodes.
    let operator = Operator::start(&env.cluster, 3, "60s").await;
    eventually_within(
        "the operator to list every kind it watches",
        STEP,
        || async {
            let events = env.cluster.audit_events();
            operator.has_listed_everything(&events).then_some(())
        },
    )
    .await;
    let (rss_idle_again, _) = operator.memory_mib();
    let load_started = Instant::now();
    futures::stream::iter(0..load_mirrors)
        .for_each_concurrent(8, |i| {
            let mirrors = mirrors.clone();
            async move {
                let manifest = load_mirror(i);
                mirrors
                    .patch(
                        &format!("load-{i}"),
                        &PatchParams::apply("bench").force(),
                        &Patch::Apply(&manifest),
                    )
                    .await
                    .unwrap();
            }
        })
        .await;
    let applied = load_started.elapsed();
    let mut peak_during_load: f64 = 0.0;
    let all_status = wait_for(LOAD_DEADLINE, Duration::from_millis(500), || {
        let mirrors = mirrors.clone();
        let (rss, _) = operator.memory_mib();
        peak_during_load = peak_during_load.max(rss);
        async move {
            let list = mirrors.list(&ListParams::default()).await.ok()?;
            let done = list
                .items
                .iter()
                .filter(|m| m.data["status"]["observedGeneration"] == 1)
                .count();
            (done == load_mirrors).then(|| load_started.elapsed())
        }
    })
    .await
    .unwrap_or_else(|_| panic!("every load mirror has a status within {LOAD_DEADLINE:?}"));
    let (rss_statuses, _) = operator.memory_mib();
    let (load_sum, load_count) = operator.reconcile_sum_count().await;
    let want_pods = u64::try_from(load_mirrors).unwrap() * u64::from(idle_nodes)
        + u64::try_from(load_mirrors).unwrap();
    let pods_started = Instant::now();
    let pods = wait_for(LOAD_DEADLINE, Duration::from_secs(2), || async {
        let n = pod_count(&env.client).await;
        (n >= want_pods).then_some(n)
    })
    .await
    .unwrap_or_else(|_| panic!("{want_pods} pods within {LOAD_DEADLINE:?}"));
    let pods_time = pods_started.elapsed() + all_status;
    // One full requeue round with every pod present: each mirror lists its 50 agent pods.
    let round_from = operator.reconciliations().await;
    let round_target = round_from + u64::try_from(load_mirrors).unwrap();
    let mut peak_round: f64 = 0.0;
    wait_for(Duration::from_secs(240), Duration::from_millis(500), || {
        let (rss, _) = operator.memory_mib();
        peak_round = peak_round.max(rss);
        let operator = &operator;
        async move { (operator.reconciliations().await >= round_target).then_some(()) }
    })
    .await
    .unwrap_or_else(|_| panic!("a requeue round of {load_mirrors} passes"));
    let (rss_round, hwm) = operator.memory_mib();

    let rows: Vec<(String, String, &str)> = vec![
        (
            format!(
                "kubectl apply → Ready=True, {REAL_NODES} fake nodes, default requeue (60 s \
                 once Ready, 5 s before) (median of {READY_RUNS_DEFAULT})"
            ),
            format!(
                "{} (first status {}; delete → gone {}); NodesConfigured before: {}",
                seconds(slow.0),
                seconds(slow.1),
                seconds(slow.2),
                slow.3
            ),
            previous::APPLY_TO_READY,
        ),
        (
            format!(
                "kubectl apply → Ready=True, {REAL_NODES} fake nodes, --requeue-after=1s \
                 (median of {READY_RUNS_FAST})"
            ),
            format!(
                "{} (first status {}; delete → gone {})",
                seconds(fast.0),
                seconds(fast.1),
                seconds(fast.2)
            ),
            "—",
        ),
        (
            "mean reconcile, one mirror at a time (operator histogram)".to_owned(),
            format!("{:.1} ms", alone_sum / alone_count.max(1.0) * 1000.0),
            previous::RECONCILE_ALONE,
        ),
        (
            format!("API requests per idle reconcile ({passes} passes, 1 mirror)"),
            format!(
                "{:.1} reads ({}), {} writes; besides, {lease_requests} Lease requests of the \
                 leader elector in the window",
                per_pass(reads_total),
                read_detail.join(", "),
                writes.len()
            ),
            previous::IDLE_REQUESTS,
        ),
        (
            "operator RSS idle (leader, watches listed, no mirror)".to_owned(),
            format!("{rss_idle:.1} MiB (again before the load: {rss_idle_again:.1} MiB)"),
            previous::RSS_IDLE,
        ),
        (
            format!("{load_mirrors} mirrors applied → all with a status"),
            format!(
                "{} (applies sent in {})",
                seconds(all_status),
                seconds(applied)
            ),
            previous::LOAD_TIME,
        ),
        (
            format!("mean reconcile while the {load_mirrors} queue"),
            format!(
                "{:.0} ms ({load_count} passes)",
                load_sum / load_count.max(1.0) * 1000.0
            ),
            previous::RECONCILE_LOADED,
        ),
        (
            format!("operator RSS with {load_mirrors} mirrors, {idle_nodes} nodes"),
            format!(
                "{rss_statuses:.1} MiB when all have a status (peak {peak_during_load:.1}); \
                 {rss_round:.1} MiB after a requeue round with the {pods} pods \
                 (made in {}; peak {peak_round:.1}, VmHWM {hwm:.1})",
                seconds(pods_time)
            ),
            previous::RSS_LOADED,
        ),
    ];
    println!();
    println!(
        "operator against a real API server: {REAL_NODES} fake nodes (kubelet stand-in, containerd, \
         real registry and agent pods) + {idle_nodes} idle nodes (registered only, pods Pending); \
         operator {}; load average at the end {}",
        binary.display(),
        load_average()
    );
    println!("| figure | real API server | previous (fake API) |");
    println!("|---|---|---|");
    for (figure, now, before) in &rows {
        println!("| {figure} | {now} | {before} |");
    }
    assert!(
        writes.is_empty(),
        "idle passes write nothing but Lease renewals: {writes:?}"
    );
}
