//! The operator's caches of the objects it owns: one reflector store per kind (Deployment,
//! StatefulSet, DaemonSet, Service, ConfigMap, PodDisruptionBudget), fed by the same watch that
//! triggers the controller, so one watch per kind serves both.
//!
//! Invariants:
//! - Every watch is filtered by [`MANAGED_BY_SELECTOR`], the label the build stage puts on every
//!   owned object, so the caches hold only the operator's objects (not every ConfigMap).
//! - The caches are read, never trusted for anything irreversible: a stale entry can only cause a
//!   redundant apply (harmless) or a delayed delete, and the watch event that refreshes the entry
//!   triggers the owner's next pass, which then converges (level-triggered).
//! - `managedFields` are dropped before caching (the apply decision never reads them).

use std::fmt::Debug;
use std::time::Duration;

use futures::Stream;
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{ConfigMap, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::NamespaceResourceScope;
use kube::api::Api;
use kube::runtime::reflector::store::Writer;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::Resource;
use serde::de::DeserializeOwned;
use serde::Serialize;

/// Label selector of every owned object (set by the build stage).
pub const MANAGED_BY_SELECTOR: &str = "app.kubernetes.io/managed-by=cachalot-operator";

/// Read handles of the caches of owned objects.
#[derive(Clone)]
pub struct OwnedStores {
    /// Registry workloads with emptyDir storage.
    pub deployments: Store<Deployment>,
    /// Registry workloads with PVC storage.
    pub stateful_sets: Store<StatefulSet>,
    /// Node agents.
    pub daemon_sets: Store<DaemonSet>,
    /// Registry Services.
    pub services: Store<Service>,
    /// Registry configs and agent desired states.
    pub config_maps: Store<ConfigMap>,
    /// Registry disruption budgets.
    pub pod_disruption_budgets: Store<PodDisruptionBudget>,
}

impl std::fmt::Debug for OwnedStores {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OwnedStores").finish_non_exhaustive()
    }
}

/// Write handles of the same caches: each goes to the watch of its kind ([`watch_owned`]), or,
/// in tests, is fed watcher events by hand.
pub struct OwnedWriters {
    /// See [`OwnedStores::deployments`].
    pub deployments: Writer<Deployment>,
    /// See [`OwnedStores::stateful_sets`].
    pub stateful_sets: Writer<StatefulSet>,
    /// See [`OwnedStores::daemon_sets`].
    pub daemon_sets: Writer<DaemonSet>,
    /// See [`OwnedStores::services`].
    pub services: Writer<Service>,
    /// See [`OwnedStores::config_maps`].
    pub config_maps: Writer<ConfigMap>,
    /// See [`OwnedStores::pod_disruption_budgets`].
    pub pod_disruption_budgets: Writer<PodDisruptionBudget>,
}

impl std::fmt::Debug for OwnedWriters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OwnedWriters").finish_non_exhaustive()
    }
}

impl OwnedWriters {
    /// Marks every cache as listed (empty so far), as the end of a watch's initial list does.
    /// For tests that feed the caches by hand.
    pub fn mark_listed(&mut self) {
        self.deployments
            .apply_watcher_event(&watcher::Event::InitDone);
        self.stateful_sets
            .apply_watcher_event(&watcher::Event::InitDone);
        self.daemon_sets
            .apply_watcher_event(&watcher::Event::InitDone);
        self.services.apply_watcher_event(&watcher::Event::InitDone);
        self.config_maps
            .apply_watcher_event(&watcher::Event::InitDone);
        self.pod_disruption_budgets
            .apply_watcher_event(&watcher::Event::InitDone);
    }
}

/// Fresh, empty caches (not ready until their watch has listed once).
#[must_use]
pub fn owned_stores() -> (OwnedStores, OwnedWriters) {
    let (deployments, deployments_w) = reflector::store();
    let (stateful_sets, stateful_sets_w) = reflector::store();
    let (daemon_sets, daemon_sets_w) = reflector::store();
    let (services, services_w) = reflector::store();
    let (config_maps, config_maps_w) = reflector::store();
    let (pod_disruption_budgets, pod_disruption_budgets_w) = reflector::store();
    (
        OwnedStores {
            deployments,
            stateful_sets,
            daemon_sets,
            services,
            config_maps,
            pod_disruption_budgets,
        },
        OwnedWriters {
            deployments: deployments_w,
            stateful_sets: stateful_sets_w,
            daemon_sets: daemon_sets_w,
            services: services_w,
            config_maps: config_maps_w,
            pod_disruption_budgets: pod_disruption_budgets_w,
        },
    )
}

/// A kind the operator owns, with its cache.
pub trait Owned:
    Resource<DynamicType = (), Scope = NamespaceResourceScope>
    + Clone
    + Serialize
    + DeserializeOwned
    + Debug
    + Send
    + Sync
    + 'static
{
    /// This kind's cache.
    fn store(stores: &OwnedStores) -> &Store<Self>;
}

impl Owned for Deployment {
    fn store(stores: &OwnedStores) -> &Store<Self> {
        &stores.deployments
    }
}
impl Owned for StatefulSet {
    fn store(stores: &OwnedStores) -> &Store<Self> {
        &stores.stateful_sets
    }
}
impl Owned for DaemonSet {
    fn store(stores: &OwnedStores) -> &Store<Self> {
        &stores.daemon_sets
    }
}
impl Owned for Service {
    fn store(stores: &OwnedStores) -> &Store<Self> {
        &stores.services
    }
}
impl Owned for ConfigMap {
    fn store(stores: &OwnedStores) -> &Store<Self> {
        &stores.config_maps
    }
}
impl Owned for PodDisruptionBudget {
    fn store(stores: &OwnedStores) -> &Store<Self> {
        &stores.pod_disruption_budgets
    }
}

/// How long a pass waits for a cache to finish its first list before it fails (and retries
/// with backoff). Only the first passes after start-up ever wait.
pub const CACHE_SYNC_TIMEOUT: Duration = Duration::from_secs(10);

/// Failure to read a cache of owned objects.
#[derive(Debug, thiserror::Error)]
pub enum ReadCacheError {
    /// The watch of this kind has not completed its first list.
    #[error(
        "the cache of {kind} objects is not synced after {waited:?}; \
         check that the operator may list and watch {kind} (RBAC)"
    )]
    NotSynced {
        /// Object kind.
        kind: String,
        /// How long the pass waited.
        waited: Duration,
    },
}

impl ReadCacheError {
    /// The static category used in metrics labels and Event reasons.
    #[must_use]
    pub fn category(&self) -> &'static str {
        "CacheNotSynced"
    }
}

/// The cached `namespace/name` of kind `K`, if any, once the cache has listed (waiting at most
/// [`CACHE_SYNC_TIMEOUT`]).
///
/// # Errors
/// [`ReadCacheError::NotSynced`] when the first list did not complete in time.
pub async fn cached<K: Owned>(
    stores: &OwnedStores,
    namespace: &str,
    name: &str,
) -> Result<Option<K>, ReadCacheError> {
    let store = K::store(stores);
    match tokio::time::timeout(CACHE_SYNC_TIMEOUT, store.wait_until_ready()).await {
        Ok(Ok(())) => {}
        Ok(Err(_)) | Err(_) => {
            return Err(ReadCacheError::NotSynced {
                kind: K::kind(&()).into_owned(),
                waited: CACHE_SYNC_TIMEOUT,
            })
        }
    }
    Ok(store
        .get(&ObjectRef::new(name).within(namespace))
        .map(|k| K::clone(&k)))
}

/// The watch of kind `K` that fills its cache through `writer` and yields every touched object
/// (applied or deleted), for `Controller::owns_stream` to trigger the owning mirror.
pub fn watch_owned<K: Owned>(
    api: Api<K>,
    writer: Writer<K>,
) -> impl Stream<Item = Result<K, watcher::Error>> + Send + 'static {
    let config = watcher::Config::default()
        .labels(MANAGED_BY_SELECTOR)
        .any_semantic();
    watcher(api, config)
        .default_backoff()
        .modify(|object: &mut K| object.meta_mut().managed_fields = None)
        .reflect(writer)
        .touched_objects()
}
