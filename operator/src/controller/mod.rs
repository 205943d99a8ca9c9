//! The reconcile pipeline for `RegistryMirror`: fetch → validate → build (pure) → apply (SSA) →
//! observe → warm → status.
//!
//! Invariants:
//! - Level-triggered: every pass recomputes everything from the object and the world; nothing
//!   branches on what changed.
//! - Permanent problems (invalid spec) are written to status and wait for a change
//!   (`Action::await_change()`); transient ones return an error and are retried with a per-object
//!   exponential backoff.
//! - A conflicting mirror applies nothing. A mirror whose spec turns invalid keeps what it last
//!   applied (nodes keep working) and says so in status. So does a mirror whose credentials
//!   Secret or CA ConfigMap is missing (checked by metadata only, see [`references`]); it is
//!   looked at again every requeue period.
//! - A pass over an unchanged world writes nothing: owned objects are compared with the
//!   operator's caches of them ([`owned`], fed by the same watches that trigger the controller)
//!   and applied only when missing, changed or drifted ([`drift`]); unwanted objects are deleted
//!   only when cached; the finalizer and status are written only when they differ.
//! - Workload pins (`spec.pinWorkloadImages`): the Pods are listed at each pass, before anything
//!   is applied, so a failed list applies nothing (the registry keeps its last pin file) instead
//!   of applying a ConfigMap without pins. They refresh at the requeue cadence; see
//!   [`workload_pins`] for why there is no Pod watch.
//! - `spec.warm` runs as a background job per mirror ([`warm`]): a pass starts it or reads its
//!   progress and never waits for it; what to do is a pure decision from the list's hash, the
//!   previous `status.warm`, the job and the clock.
//! - Deletion: the finalizer stays until every running node agent reports that it removed this
//!   mirror's files (or no agent runs, or the `cachalot.dev/skip-node-cleanup: "true"` annotation
//!   is set); owned objects then go by garbage collection through their owner references.
//!
//! Entry points: [`run`] (what `cachalot-operator run` calls once leader, and what tests call
//! without leader election) and [`reconcile_mirror`] (one pass, used by mocked-API tests).

pub mod apply;
pub mod build;
pub mod conflict;
pub mod drift;
pub mod observe;
pub mod owned;
pub mod references;
pub mod status;
pub mod validate;
pub mod warm;
pub mod workload_pins;

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::Api;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::Store;
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};
use tracing::{debug, info, warn};

use crate::api::{RegistryMirror, RegistryMirrorStatus, CRD_NAME};
use crate::leader::LeaseGuard;
use crate::metrics::Metrics;
use apply::{
    apply_owned, delete_if_cached, get_opt, has_finalizer, set_finalizer, ApplyError, OwnedWrites,
};
use build::{
    agent_name, build_agent, build_registry_with_pins, node_endpoint, peers_service_name,
    registry_config_name, registry_name, selector_string, stateful_set_needs_replacement,
    BuildConfig, BuildError, Workload, AGENT_PORT, REGISTRY_ADMIN_PORT,
};
use observe::{
    list_component_pods, not_ready_pods, probe_agents, probe_registries, running_pods, HttpProbe,
    Observations, ObserveError, Probe,
};
use owned::{cached, owned_stores, watch_owned, OwnedStores};
use references::{missing_objects, referenced_objects, CheckReferencesError};
use status::{compute_status, transitions, with_warm, write_status, Outcome, StatusError};
use validate::{validate, Exposure, Validated};
use warm::{WarmDecision, WarmJobs};
use workload_pins::{list_workload_pods, workload_pins, ListWorkloadPodsError, WorkloadPins};

/// Annotation that lets a stuck deletion proceed without node cleanup (nodes gone for good).
pub const SKIP_CLEANUP_ANNOTATION: &str = "cachalot.dev/skip-node-cleanup";
/// Name the operator reports Events under.
pub const CONTROLLER_NAME: &str = "cachalot-operator";

/// Settings of the controller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControllerConfig {
    /// What shapes every mirror's objects: the default image of registry and agent pods, this
    /// cluster's name (`--cluster-name`, the first part of a spoke's default id).
    pub build: BuildConfig,
    /// Period of the status refresh (stats, nodes) for a healthy mirror.
    pub requeue_after: Duration,
    /// Period of the status refresh while a running mirror is not Ready yet (nodes and registry
    /// pods are probed, not watched, so this bounds how late Ready shows); capped by
    /// `requeue_after`.
    pub converging_requeue_after: Duration,
    /// Period while waiting for nodes to clean up on deletion.
    pub cleanup_requeue_after: Duration,
    /// Timeout of each `/stats` and `/status` probe.
    pub probe_timeout: Duration,
    /// Watch only this namespace (all namespaces when `None`).
    pub namespace: Option<String>,
    /// This replica's identity in Events (`reportingInstance`), e.g. the pod name.
    pub instance: Option<String>,
}

impl ControllerConfig {
    /// Defaults with the given image.
    #[must_use]
    pub fn new(image: impl Into<String>) -> Self {
        Self {
            build: BuildConfig {
                image: image.into(),
                cluster_name: None,
            },
            requeue_after: Duration::from_secs(60),
            converging_requeue_after: Duration::from_secs(5),
            cleanup_requeue_after: Duration::from_secs(5),
            probe_timeout: Duration::from_secs(2),
            namespace: None,
            instance: None,
        }
    }
}

/// Failure of one reconcile pass; every variant is transient and retried with backoff.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    /// Building objects failed.
    #[error(transparent)]
    Build(#[from] BuildError),
    /// Writing objects failed.
    #[error(transparent)]
    Apply(#[from] ApplyError),
    /// Listing pods failed.
    #[error(transparent)]
    Observe(#[from] ObserveError),
    /// Listing the Pods whose images are pinned failed.
    #[error(transparent)]
    WorkloadPods(#[from] ListWorkloadPodsError),
    /// Checking that a referenced Secret or ConfigMap exists failed.
    #[error(transparent)]
    References(#[from] CheckReferencesError),
    /// Writing status failed.
    #[error(transparent)]
    Status(#[from] StatusError),
    /// The object has no namespace (it is namespaced, so the API never sends that).
    #[error("RegistryMirror {0} has no namespace")]
    MissingNamespace(String),
    /// This replica's leader lease is not (or no longer) safely held: nothing is written.
    #[error("not writing: the leader lease is not held (renewal overdue)")]
    NotLeader,
}

impl ReconcileError {
    /// The static category used in metrics labels and Event reasons.
    #[must_use]
    pub fn category(&self) -> &'static str {
        match self {
            Self::Build(e) => e.category(),
            Self::Apply(e) => e.category(),
            Self::Observe(e) => e.category(),
            Self::WorkloadPods(e) => e.category(),
            Self::References(e) => e.category(),
            Self::Status(e) => e.category(),
            Self::MissingNamespace(_) => "MissingNamespace",
            Self::NotLeader => "NotLeader",
        }
    }
}

/// Failure to start or run the controller.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The CRD is not installed.
    #[error(
        "the CustomResourceDefinition {CRD_NAME} is not installed; install it with \
         `kubectl apply -f crds/registrymirrors.cachalot.dev.yaml` or the Helm chart \
         (crds.enabled=true); the operator never installs CRDs itself"
    )]
    CrdMissing,
    /// The CRD could not be read.
    #[error("cannot check for the CustomResourceDefinition {CRD_NAME}: {0}")]
    CrdCheck(#[source] kube::Error),
    /// The HTTP probe client could not be built.
    #[error("cannot build the HTTP client for stats probes: {0}")]
    ProbeClient(#[source] reqwest::Error),
}

/// Shared state of the reconciler.
pub struct Context {
    /// Kubernetes client.
    pub client: Client,
    /// Controller settings.
    pub config: ControllerConfig,
    /// HTTP probes of registry pods and agents.
    pub probe: Arc<dyn Probe>,
    /// Every RegistryMirror (the controller's reflector), for conflict detection.
    pub mirrors: Store<RegistryMirror>,
    /// The caches of owned objects, for the apply decision.
    pub owned: OwnedStores,
    /// Event publisher.
    pub recorder: Recorder,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// The leader lease this replica writes under (`None` without leader election).
    pub lease: Option<LeaseGuard>,
    /// The `spec.warm` jobs, one per mirror at most (see [`warm`]).
    pub warms: WarmJobs,
    /// Consecutive failures per object, for the backoff.
    failures: Mutex<HashMap<String, u32>>,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Context {
    /// A context; `mirrors` is the store conflicts are checked against, `owned` the caches
    /// owned objects are compared with.
    #[must_use]
    pub fn new(
        client: Client,
        config: ControllerConfig,
        probe: Arc<dyn Probe>,
        mirrors: Store<RegistryMirror>,
        owned: OwnedStores,
        metrics: Arc<Metrics>,
    ) -> Self {
        let recorder = Recorder::new(
            client.clone(),
            Reporter {
                controller: CONTROLLER_NAME.to_string(),
                instance: config.instance.clone(),
            },
        );
        Self {
            client,
            config,
            probe,
            mirrors,
            owned,
            recorder,
            metrics,
            lease: None,
            warms: WarmJobs::default(),
            failures: Mutex::new(HashMap::new()),
        }
    }

    /// The same context, writing only while `lease` is held.
    #[must_use]
    pub fn with_lease(mut self, lease: LeaseGuard) -> Self {
        self.lease = Some(lease);
        self
    }

    /// Whether this replica must not write now: it elects a leader and its lease is not safely
    /// held (see [`LeaseGuard`]).
    #[must_use]
    pub fn lease_lapsed(&self) -> bool {
        self.lease.as_ref().is_some_and(|lease| !lease.held())
    }

    /// What the store-aware writes of the apply stage need.
    #[must_use]
    pub fn writes(&self) -> OwnedWrites<'_> {
        OwnedWrites {
            client: &self.client,
            owned: &self.owned,
            metrics: &self.metrics,
            lease: self.lease.as_ref(),
        }
    }

    fn note_failure(&self, key: &str) -> u32 {
        let Ok(mut map) = self.failures.lock() else {
            return 1;
        };
        let n = map.entry(key.to_string()).or_insert(0);
        *n = n.saturating_add(1);
        *n
    }

    fn note_success(&self, key: &str) {
        if let Ok(mut map) = self.failures.lock() {
            map.remove(key);
        }
    }
}

/// Backoff after `failures` consecutive failures: 5 s doubling, capped at 5 min.
#[must_use]
pub fn backoff(failures: u32) -> Duration {
    let exp = failures.saturating_sub(1).min(6);
    Duration::from_secs(5u64 << exp).min(Duration::from_secs(300))
}

fn object_key(mirror: &RegistryMirror) -> String {
    format!(
        "{}/{}",
        mirror.namespace().unwrap_or_default(),
        mirror.name_any()
    )
}

/// Fails with a clear message when the CRD is not installed.
///
/// # Errors
/// [`RunError::CrdMissing`] or [`RunError::CrdCheck`].
pub async fn ensure_crd_installed(client: &Client) -> Result<(), RunError> {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    match crds.get_opt(CRD_NAME).await {
        Ok(Some(_)) => Ok(()),
        Ok(None) => Err(RunError::CrdMissing),
        Err(e) => Err(RunError::CrdCheck(e)),
    }
}

/// Runs the RegistryMirror controller until `shutdown` completes, without leader election
/// (the caller decides whether this replica leads). Builds the HTTP probe and fresh metrics.
///
/// # Errors
/// [`RunError`] when the probe client cannot be built.
pub async fn run(
    client: Client,
    config: ControllerConfig,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) -> Result<(), RunError> {
    let probe: Arc<dyn Probe> =
        Arc::new(HttpProbe::new(config.probe_timeout).map_err(RunError::ProbeClient)?);
    run_with(client, config, probe, Arc::new(Metrics::new()), shutdown).await;
    Ok(())
}

fn api_for<K>(client: &Client, namespace: Option<&str>) -> Api<K>
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// Like [`run`], with the probe and metrics supplied by the caller (no leader lease: every
/// pass may write).
pub async fn run_with(
    client: Client,
    config: ControllerConfig,
    probe: Arc<dyn Probe>,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) {
    run_leading(client, config, probe, metrics, shutdown, None).await;
}

/// Like [`run_with`], writing only while `lease` is held (see [`LeaseGuard`]).
pub async fn run_leading(
    client: Client,
    config: ControllerConfig,
    probe: Arc<dyn Probe>,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
    lease: Option<LeaseGuard>,
) {
    let ns = config.namespace.clone();
    let mirrors: Api<RegistryMirror> = api_for(&client, ns.as_deref());
    let controller = Controller::new(mirrors, watcher::Config::default().any_semantic());
    let store = controller.store();
    let (owned, writers) = owned_stores();
    let mut ctx = Context::new(client.clone(), config, probe, store, owned, metrics);
    if let Some(lease) = lease {
        ctx = ctx.with_lease(lease);
    }
    let ctx = Arc::new(ctx);
    info!(
        namespace = ns.as_deref().unwrap_or("*"),
        "starting RegistryMirror controller"
    );
    let ns = ns.as_deref();
    // One watch per owned kind feeds its cache and triggers the owning mirror.
    controller
        .owns_stream(watch_owned::<Deployment>(
            api_for(&client, ns),
            writers.deployments,
        ))
        .owns_stream(watch_owned::<StatefulSet>(
            api_for(&client, ns),
            writers.stateful_sets,
        ))
        .owns_stream(watch_owned::<DaemonSet>(
            api_for(&client, ns),
            writers.daemon_sets,
        ))
        .owns_stream(watch_owned::<Service>(
            api_for(&client, ns),
            writers.services,
        ))
        .owns_stream(watch_owned::<ConfigMap>(
            api_for(&client, ns),
            writers.config_maps,
        ))
        .owns_stream(watch_owned::<PodDisruptionBudget>(
            api_for(&client, ns),
            writers.pod_disruption_budgets,
        ))
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            match result {
                Ok((obj, _)) => debug!(mirror = %obj, "reconciled"),
                Err(error) => debug!(%error, "reconcile stream error"),
            }
        })
        .await;
    info!("RegistryMirror controller stopped");
}

async fn reconcile(
    mirror: Arc<RegistryMirror>,
    ctx: Arc<Context>,
) -> Result<Action, ReconcileError> {
    let started = Instant::now();
    let result = reconcile_mirror(&mirror, &ctx).await;
    ctx.metrics.observe_reconcile(
        started.elapsed(),
        result.as_ref().err().map(ReconcileError::category),
    );
    if result.is_ok() {
        ctx.note_success(&object_key(&mirror));
    }
    result
}

fn error_policy(mirror: Arc<RegistryMirror>, error: &ReconcileError, ctx: Arc<Context>) -> Action {
    let key = object_key(&mirror);
    let failures = ctx.note_failure(&key);
    let delay = backoff(failures);
    warn!(mirror = %key, category = error.category(), %error, failures, retry_in = ?delay, "reconcile failed");
    Action::requeue(delay)
}

fn now() -> Time {
    Time(k8s_openapi::jiff::Timestamp::now())
}

async fn publish(
    ctx: &Context,
    mirror: &RegistryMirror,
    warning: bool,
    reason: &str,
    note: String,
) {
    let event = Event {
        type_: if warning {
            EventType::Warning
        } else {
            EventType::Normal
        },
        reason: reason.to_string(),
        note: Some(note.chars().take(1000).collect()),
        action: "Reconcile".to_string(),
        secondary: None,
    };
    if let Err(error) = ctx.recorder.publish(&event, &mirror.object_ref(&())).await {
        // Events are best effort: a refused Event must not fail the reconcile.
        warn!(mirror = %object_key(mirror), %error, "cannot publish event");
    }
}

async fn finish_status(
    ctx: &Context,
    api: &Api<RegistryMirror>,
    mirror: &RegistryMirror,
    outcome: &Outcome,
    pins: Option<&WorkloadPins>,
    warm: Option<&WarmDecision>,
) -> Result<RegistryMirrorStatus, ReconcileError> {
    let at = now();
    let mut next = compute_status(mirror, outcome, &at);
    next.pinned_images = pins.map(|p| i32::try_from(p.len()).unwrap_or(i32::MAX));
    let decided = warm.map(|w| (w.status.clone(), w.condition.clone()));
    with_warm(&mut next, mirror.status.as_ref(), decided, &at);
    let events = transitions(mirror.status.as_ref(), &next);
    if mirror.status.as_ref() != Some(&next) && ctx.lease_lapsed() {
        return Err(ReconcileError::NotLeader);
    }
    write_status(api, mirror, &next).await?;
    for t in events {
        publish(ctx, mirror, t.warning, &t.reason, t.note).await;
    }
    Ok(next)
}

/// When a running mirror is looked at again: every `requeue_after` once Ready, sooner while it
/// converges (what it waits for, registry pods and node agents, is probed, not watched). Pure.
#[must_use]
pub fn running_requeue(status: &RegistryMirrorStatus, config: &ControllerConfig) -> Duration {
    if status.is_ready() {
        config.requeue_after
    } else {
        config.converging_requeue_after.min(config.requeue_after)
    }
}

/// One reconcile pass for one mirror.
///
/// # Errors
/// [`ReconcileError`] for transient failures (the caller retries with backoff).
pub async fn reconcile_mirror(
    mirror: &RegistryMirror,
    ctx: &Context,
) -> Result<Action, ReconcileError> {
    let namespace = mirror
        .namespace()
        .ok_or_else(|| ReconcileError::MissingNamespace(mirror.name_any()))?;
    let api: Api<RegistryMirror> = Api::namespaced(ctx.client.clone(), &namespace);
    // A replica that is not sure of its lease does not even start a pass.
    if ctx.lease_lapsed() {
        return Err(ReconcileError::NotLeader);
    }
    if mirror.metadata.deletion_timestamp.is_some() {
        return cleanup(mirror, ctx, &api, &namespace).await;
    }
    let mirror = if has_finalizer(mirror) {
        mirror.clone()
    } else {
        if ctx.lease_lapsed() {
            return Err(ReconcileError::NotLeader);
        }
        set_finalizer(&api, mirror, true).await?
    };
    let v = match validate(&mirror) {
        Ok(v) => v,
        Err(error) => {
            info!(mirror = %object_key(&mirror), %error, "invalid spec");
            let outcome = Outcome::Invalid {
                message: error.to_string(),
            };
            finish_status(ctx, &api, &mirror, &outcome, None, None).await?;
            return Ok(Action::await_change());
        }
    };
    let others = ctx.mirrors.state();
    if let Some(conflict) = conflict::find_conflict(&mirror, others.iter().map(AsRef::as_ref)) {
        info!(mirror = %object_key(&mirror), winner = %conflict.winner, "conflict");
        finish_status(
            ctx,
            &api,
            &mirror,
            &Outcome::Conflicting(conflict),
            None,
            None,
        )
        .await?;
        // The winner changing or going away does not trigger this object; look again later.
        return Ok(Action::requeue(ctx.config.requeue_after));
    }
    if !matches!(v.exposure, Exposure::External(_)) {
        let missing =
            missing_objects(&ctx.client, &namespace, &referenced_objects(&mirror)).await?;
        if !missing.is_empty() {
            let listed: Vec<&str> = missing.iter().map(|m| m.message.as_str()).collect();
            info!(mirror = %object_key(&mirror), missing = %listed.join("; "), "referenced object missing");
            let outcome = Outcome::ReferencesMissing { missing };
            finish_status(ctx, &api, &mirror, &outcome, None, None).await?;
            // No Secret or ConfigMap watch: creating the object is noticed at the next requeue.
            return Ok(Action::requeue(ctx.config.requeue_after));
        }
    }

    let pins = pins_of_workloads(ctx, &mirror, &v).await?;
    let registry = build_registry_with_pins(&mirror, &v, &ctx.config.build, pins.as_ref())?;
    let external = registry.is_none();
    let (service, ready_replicas) = apply_registry(ctx, &namespace, &v, registry).await?;
    let endpoint = node_endpoint(&v, service.as_ref());
    let agent = build_agent(&mirror, &v, &ctx.config.build, endpoint.as_deref(), false)?;
    apply_owned(ctx.writes(), &agent.config_map).await?;
    let daemon_set = apply_owned(ctx.writes(), &agent.daemon_set).await?;
    let desired_nodes = daemon_set
        .status
        .as_ref()
        .filter(|s| s.observed_generation >= daemon_set.metadata.generation)
        .map(|s| s.desired_number_scheduled);

    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &namespace);
    let (registry_pods, registry_pods_not_ready, warm_target) = if external {
        (Vec::new(), Vec::new(), None)
    } else {
        let listed = list_component_pods(
            &pods,
            &namespace,
            &selector_string(&v.name, "registry"),
            "registry",
        )
        .await?;
        let running = running_pods(&listed);
        let probed = probe_registries(&ctx.probe, running.clone(), REGISTRY_ADMIN_PORT).await;
        let target = warm_target(&running, &probed);
        (probed, not_ready_pods(&listed), target)
    };
    let agent_pods = list_component_pods(
        &pods,
        &namespace,
        &selector_string(&v.name, "node-agent"),
        "node-agent",
    )
    .await?;
    let agents = probe_agents(&ctx.probe, running_pods(&agent_pods), AGENT_PORT).await;
    let reserves: BTreeMap<String, u64> = mirror
        .spec
        .registries
        .iter()
        .map(|r| {
            (
                r.name.clone(),
                r.budget_reserve
                    .and_then(|x| u64::try_from(x).ok())
                    .unwrap_or(0),
            )
        })
        .collect();
    let outcome = Outcome::Running {
        endpoint,
        external,
        desired_generation: agent.desired.generation.clone(),
        reserves,
        observations: Observations {
            registry_pods,
            registry_pods_not_ready,
            ready_replicas,
            desired_nodes,
            agents,
        },
    };
    let key = object_key(&mirror);
    let served: Vec<&str> = v.registries.iter().map(|r| r.name.as_str()).collect();
    let plan = match warm::plan_warm(&mirror.spec.warm, &served) {
        Ok(Some(_)) if external => Err(warm::WarmSpecError::NoRegistry),
        plan => plan,
    };
    let job = ctx.warms.view(&key);
    let decision = warm::decide(&warm::WarmInput {
        plan: &plan,
        generation: mirror.metadata.generation,
        previous: mirror.status.as_ref().and_then(|s| s.warm.as_ref()),
        job: job.as_ref(),
        target: warm_target.as_deref(),
        now: u64::try_from(now().0.as_second()).unwrap_or(0),
        poll: ctx
            .config
            .converging_requeue_after
            .min(ctx.config.requeue_after),
    });
    ctx.warms.act(&key, &decision.action, &ctx.probe);
    let status =
        finish_status(ctx, &api, &mirror, &outcome, pins.as_ref(), Some(&decision)).await?;
    let requeue = running_requeue(&status, &ctx.config);
    Ok(Action::requeue(
        decision.recheck.map_or(requeue, |r| r.min(requeue)),
    ))
}

/// The admin base URL of the registry pod asked to warm: the first running pod (by name) whose
/// `/stats` answered. Pure.
#[must_use]
pub fn warm_target(
    running: &[(String, String, String)],
    probed: &[observe::RegistryPodObservation],
) -> Option<String> {
    running
        .iter()
        .find(|(name, _, _)| probed.iter().any(|p| &p.pod == name && p.stats.is_ok()))
        .map(|(_, _, ip)| observe::base_url(ip, REGISTRY_ADMIN_PORT))
}

/// The workload pins of a mirror with `spec.pinWorkloadImages` and a registry in the cluster;
/// `None` (and no Pod list) otherwise.
async fn pins_of_workloads(
    ctx: &Context,
    mirror: &RegistryMirror,
    v: &Validated,
) -> Result<Option<WorkloadPins>, ReconcileError> {
    if !mirror.spec.pin_workload_images || matches!(v.exposure, Exposure::External(_)) {
        return Ok(None);
    }
    let pods = list_workload_pods(&api_for(&ctx.client, ctx.config.namespace.as_deref())).await?;
    let registries: Vec<String> = v.registries.iter().map(|r| r.name.clone()).collect();
    let pins = workload_pins(&pods, &registries);
    if pins.dropped > 0 {
        warn!(
            mirror = %object_key(mirror),
            pinned = pins.len(),
            dropped = pins.dropped,
            "more workload images than the pin file holds; the last in sort order are not pinned"
        );
    }
    Ok(Some(pins))
}

/// Applies the registry side and removes what the spec no longer wants. Returns the Service
/// (applied or cached, for the endpoint) and the ready replicas of the workload.
///
/// A cached StatefulSet whose immutable fields differ from the desired one (a switch between
/// PVC and S3 storage) is deleted instead of applied; the next pass, triggered by its deletion
/// event, creates the new one. Claims of PVC storage stay (a StatefulSet never deletes them).
async fn apply_registry(
    ctx: &Context,
    namespace: &str,
    v: &Validated,
    registry: Option<build::RegistryObjects>,
) -> Result<(Option<Service>, i32), ReconcileError> {
    let w = ctx.writes();
    let name = registry_name(&v.name);
    let peers = peers_service_name(&v.name);
    let Some(objects) = registry else {
        delete_if_cached::<Deployment>(w, namespace, &name).await?;
        delete_if_cached::<StatefulSet>(w, namespace, &name).await?;
        delete_if_cached::<PodDisruptionBudget>(w, namespace, &name).await?;
        delete_if_cached::<Service>(w, namespace, &name).await?;
        delete_if_cached::<Service>(w, namespace, &peers).await?;
        delete_if_cached::<ConfigMap>(w, namespace, &registry_config_name(&v.name)).await?;
        return Ok((None, 0));
    };
    apply_owned(w, &objects.config_map).await?;
    let ready = match &objects.workload {
        Workload::Deployment(d) => {
            let applied = apply_owned(w, d.as_ref()).await?;
            delete_if_cached::<StatefulSet>(w, namespace, &name).await?;
            applied.status.and_then(|s| s.ready_replicas).unwrap_or(0)
        }
        Workload::StatefulSet(s) => {
            let live: Option<StatefulSet> = cached(&ctx.owned, namespace, &name)
                .await
                .map_err(ApplyError::from)?;
            let ready = if live
                .as_ref()
                .is_some_and(|live| stateful_set_needs_replacement(live, s))
            {
                info!(statefulset = %name, %namespace, "storage changed; replacing the StatefulSet");
                delete_if_cached::<StatefulSet>(w, namespace, &name).await?;
                0
            } else {
                let applied = apply_owned(w, s.as_ref()).await?;
                applied.status.and_then(|s| s.ready_replicas).unwrap_or(0)
            };
            delete_if_cached::<Deployment>(w, namespace, &name).await?;
            ready
        }
    };
    let service = apply_owned(w, &objects.service).await?;
    match &objects.peers_service {
        Some(peers_service) => {
            apply_owned(w, peers_service).await?;
        }
        None => delete_if_cached::<Service>(w, namespace, &peers).await?,
    }
    match &objects.pdb {
        Some(pdb) => {
            apply_owned(w, pdb).await?;
        }
        None => delete_if_cached::<PodDisruptionBudget>(w, namespace, &name).await?,
    }
    Ok((Some(service), ready))
}

/// The identity part of a mirror, enough to address its agents even when the spec is invalid.
fn identity(mirror: &RegistryMirror, namespace: &str) -> Validated {
    Validated {
        namespace: namespace.to_string(),
        name: mirror.name_any(),
        uid: mirror.uid().unwrap_or_default(),
        registries: Vec::new(),
        default_registry: String::new(),
        max_size_bytes: 0,
        exposure: Exposure::ClusterIp,
        s3: None,
        tls: None,
    }
}

async fn cleanup(
    mirror: &RegistryMirror,
    ctx: &Context,
    api: &Api<RegistryMirror>,
    namespace: &str,
) -> Result<Action, ReconcileError> {
    let key = object_key(mirror);
    ctx.warms.remove(&key);
    if !has_finalizer(mirror) {
        return Ok(Action::await_change());
    }
    let skip = mirror
        .annotations()
        .get(SKIP_CLEANUP_ANNOTATION)
        .is_some_and(|v| v == "true");
    let daemon_set: Option<DaemonSet> =
        get_opt(&ctx.client, namespace, &agent_name(&mirror.name_any())).await?;
    if daemon_set.is_none() || skip {
        let why = if skip {
            format!("{SKIP_CLEANUP_ANNOTATION} is set; node files were not checked")
        } else {
            "no node agent runs for this mirror".to_string()
        };
        if ctx.lease_lapsed() {
            return Err(ReconcileError::NotLeader);
        }
        set_finalizer(api, mirror, false).await?;
        info!(mirror = %key, reason = %why, "finalizer removed");
        publish(ctx, mirror, skip, "FinalizerRemoved", why).await;
        return Ok(Action::await_change());
    }
    let v = identity(mirror, namespace);
    let agent = build_agent(mirror, &v, &ctx.config.build, None, true)?;
    apply_owned(ctx.writes(), &agent.config_map).await?;
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), namespace);
    let listed = list_component_pods(
        &pods,
        namespace,
        &selector_string(&v.name, "node-agent"),
        "node-agent",
    )
    .await?;
    let agents = probe_agents(&ctx.probe, running_pods(&listed), AGENT_PORT).await;
    let total = agents.len();
    let pending: Vec<String> = agents
        .into_iter()
        .filter(|a| match &a.status {
            Ok(s) => s.generation != agent.desired.generation || !s.managed_files.is_empty(),
            Err(_) => true,
        })
        .map(|a| a.node)
        .collect();
    if pending.is_empty() {
        if ctx.lease_lapsed() {
            return Err(ReconcileError::NotLeader);
        }
        set_finalizer(api, mirror, false).await?;
        info!(mirror = %key, nodes = total, "node files removed; finalizer removed");
        publish(
            ctx,
            mirror,
            false,
            "NodeFilesRemoved",
            format!("{total} node(s) removed this mirror's files"),
        )
        .await;
        return Ok(Action::await_change());
    }
    finish_status(
        ctx,
        api,
        mirror,
        &Outcome::Removing { pending, total },
        None,
        None,
    )
    .await?;
    Ok(Action::requeue(ctx.config.cleanup_requeue_after))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{ConditionStatus, ConditionType, MirrorCondition};

    fn status_with_ready(ready: ConditionStatus) -> RegistryMirrorStatus {
        RegistryMirrorStatus {
            conditions: vec![MirrorCondition {
                type_: ConditionType::Ready,
                status: ready,
                reason: "Test".into(),
                message: String::new(),
                observed_generation: None,
                last_transition_time: None,
            }],
            ..RegistryMirrorStatus::default()
        }
    }

    #[test]
    fn a_ready_mirror_waits_the_full_period_and_a_converging_one_is_looked_at_sooner() {
        let mut config = ControllerConfig::new("image");
        config.requeue_after = Duration::from_secs(60);
        config.converging_requeue_after = Duration::from_secs(5);
        let ready = status_with_ready(ConditionStatus::True);
        assert_eq!(running_requeue(&ready, &config), Duration::from_secs(60));
        for not_ready in [ConditionStatus::False, ConditionStatus::Unknown] {
            let status = status_with_ready(not_ready);
            assert_eq!(running_requeue(&status, &config), Duration::from_secs(5));
        }
        assert_eq!(
            running_requeue(&RegistryMirrorStatus::default(), &config),
            Duration::from_secs(5),
            "no conditions yet is not Ready"
        );
        // The converging period never exceeds the normal one.
        config.requeue_after = Duration::from_secs(2);
        assert_eq!(
            running_requeue(&status_with_ready(ConditionStatus::False), &config),
            Duration::from_secs(2)
        );
    }
}
