//! Apply stage: server-side apply of the built objects with one field manager, removal of
//! objects the spec no longer wants, and the finalizer patches.
//!
//! Invariants:
//! - An owned object is written only when the apply decision ([`super::drift`]) says it is
//!   missing from the cache, changed or drifted; otherwise the cached live object is used as the
//!   result, so a pass over an unchanged world makes no write. An unwanted object is deleted only
//!   when the cache holds it. Each decision is logged at debug level and counted in metrics.
//! - Every write uses field manager `cachalot-operator` with `force` (the operator owns these
//!   objects outright); deletes of absent objects are not errors; finalizer changes carry the
//!   object's `resourceVersion`, so a concurrent change makes them fail and retry instead of
//!   clobbering another writer's list.

use std::fmt::Debug;

use k8s_openapi::NamespaceResourceScope;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::{Client, Resource};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::json;
use tracing::debug;

use super::drift::{apply_reason, desired_hash, ApplyReason, APPLIED_HASH_ANNOTATION};
use super::owned::{cached, Owned, OwnedStores, ReadCacheError};
use crate::api::{RegistryMirror, FINALIZER};
use crate::leader::LeaseGuard;
use crate::metrics::Metrics;

/// The one field manager of every write the operator makes.
pub const FIELD_MANAGER: &str = "cachalot-operator";

/// Failure to write an object.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// Server-side apply was refused.
    #[error("cannot apply {kind} {namespace}/{name}: {source}")]
    Apply {
        /// Object kind.
        kind: String,
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
        /// API error.
        #[source]
        source: kube::Error,
    },
    /// Deleting an object no longer wanted failed.
    #[error("cannot delete {kind} {namespace}/{name}: {source}")]
    Delete {
        /// Object kind.
        kind: String,
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
        /// API error.
        #[source]
        source: kube::Error,
    },
    /// Reading an owned object failed.
    #[error("cannot read {kind} {namespace}/{name}: {source}")]
    Get {
        /// Object kind.
        kind: String,
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
        /// API error.
        #[source]
        source: kube::Error,
    },
    /// The cache of owned objects could not be read.
    #[error(transparent)]
    Cache(#[from] ReadCacheError),
    /// Adding or removing the finalizer failed.
    #[error("cannot update finalizers of {namespace}/{name}: {source}")]
    Finalizer {
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
        /// API error.
        #[source]
        source: kube::Error,
    },
    /// This replica's leader lease is not safely held: nothing was written.
    #[error("not writing: the leader lease is not held (renewal overdue)")]
    NotLeader,
}

impl ApplyError {
    /// The static category used in metrics labels and Event reasons.
    #[must_use]
    pub fn category(&self) -> &'static str {
        match self {
            Self::Apply { .. } => "ApplyFailed",
            Self::Delete { .. } => "DeleteFailed",
            Self::Get { .. } => "GetFailed",
            Self::Cache(e) => e.category(),
            Self::Finalizer { .. } => "FinalizerFailed",
            Self::NotLeader => "NotLeader",
        }
    }
}

fn kind_of<K: Resource<DynamicType = ()>>() -> String {
    K::kind(&()).into_owned()
}

/// Server-side applies `obj` (which must carry name and namespace) and returns the object as
/// the API server stored it (with allocated fields such as a Service's cluster IP).
///
/// # Errors
/// [`ApplyError::Apply`].
pub async fn apply<K>(client: &Client, obj: &K) -> Result<K, ApplyError>
where
    K: Resource<DynamicType = (), Scope = NamespaceResourceScope>
        + Serialize
        + DeserializeOwned
        + Clone
        + Debug,
{
    let namespace = obj.meta().namespace.clone().unwrap_or_default();
    let name = obj.meta().name.clone().unwrap_or_default();
    let api: Api<K> = Api::namespaced(client.clone(), &namespace);
    // SSA needs apiVersion and kind in the body; k8s-openapi types do not serialise them when
    // built with Default, so they are added here.
    let mut body = serde_json::to_value(obj).map_err(|e| ApplyError::Apply {
        kind: kind_of::<K>(),
        namespace: namespace.clone(),
        name: name.clone(),
        source: kube::Error::SerdeError(e),
    })?;
    if let Some(map) = body.as_object_mut() {
        map.insert("apiVersion".into(), json!(K::api_version(&())));
        map.insert("kind".into(), json!(K::kind(&())));
    }
    api.patch(
        &name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&body),
    )
    .await
    .map_err(|source| ApplyError::Apply {
        kind: kind_of::<K>(),
        namespace,
        name,
        source,
    })
}

/// What the store-aware writes need: the client, the caches of owned objects and the metrics.
#[derive(Clone, Copy)]
pub struct OwnedWrites<'a> {
    /// Kubernetes client.
    pub client: &'a Client,
    /// Caches of owned objects.
    pub owned: &'a OwnedStores,
    /// Where applies and deletes are counted.
    pub metrics: &'a Metrics,
    /// The leader lease writes happen under (`None` without leader election).
    pub lease: Option<&'a LeaseGuard>,
}

impl OwnedWrites<'_> {
    /// Whether writes must stop: there is a lease and it is not safely held.
    fn lease_lapsed(&self) -> bool {
        self.lease.is_some_and(|lease| !lease.held())
    }
}

impl std::fmt::Debug for OwnedWrites<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OwnedWrites").finish_non_exhaustive()
    }
}

fn encode_error<K: Resource<DynamicType = ()>>(
    namespace: &str,
    name: &str,
    e: serde_json::Error,
) -> ApplyError {
    ApplyError::Apply {
        kind: kind_of::<K>(),
        namespace: namespace.to_string(),
        name: name.to_string(),
        source: kube::Error::SerdeError(e),
    }
}

/// Applies `desired` (marked with the hash of its body in [`APPLIED_HASH_ANNOTATION`]) when the
/// cached live object is missing, carries another hash or has drifted from it; otherwise returns
/// the cached object without a request. Returns the object as the API server holds it.
///
/// # Errors
/// [`ApplyError::Cache`] when the cache has not synced, [`ApplyError::Apply`] when the apply is
/// refused.
pub async fn apply_owned<K: Owned>(writer: OwnedWrites<'_>, desired: &K) -> Result<K, ApplyError> {
    let namespace = desired.meta().namespace.clone().unwrap_or_default();
    let name = desired.meta().name.clone().unwrap_or_default();
    let kind = K::kind(&());
    let hash = desired_hash(desired).map_err(|e| encode_error::<K>(&namespace, &name, e))?;
    let mut marked = desired.clone();
    marked
        .meta_mut()
        .annotations
        .get_or_insert_with(Default::default)
        .insert(APPLIED_HASH_ANNOTATION.to_string(), hash.clone());
    let live = cached::<K>(writer.owned, &namespace, &name).await?;
    let body =
        serde_json::to_value(&marked).map_err(|e| encode_error::<K>(&namespace, &name, e))?;
    let live_body = live
        .as_ref()
        .map(serde_json::to_value)
        .transpose()
        .map_err(|e| encode_error::<K>(&namespace, &name, e))?;
    match (apply_reason(&body, &hash, live_body.as_ref()), live) {
        (None, Some(live)) => {
            debug!(%kind, %namespace, %name, "apply skipped: unchanged");
            writer.metrics.observe_apply_skipped(&kind);
            Ok(live)
        }
        (reason, _) => {
            // `None` with nothing cached cannot happen (absent is `Missing`); counted as such.
            let reason = reason.unwrap_or(ApplyReason::Missing).as_str();
            if writer.lease_lapsed() {
                return Err(ApplyError::NotLeader);
            }
            debug!(%kind, %namespace, %name, reason, "applying");
            writer.metrics.observe_apply(&kind, reason);
            apply(writer.client, &marked).await
        }
    }
}

/// Deletes `name` when the cache holds it (and it is not already being deleted); an object the
/// cache has not seen is left for the pass its watch event triggers.
///
/// # Errors
/// [`ApplyError::Cache`] or [`ApplyError::Delete`].
pub async fn delete_if_cached<K: Owned>(
    writer: OwnedWrites<'_>,
    namespace: &str,
    name: &str,
) -> Result<(), ApplyError> {
    let Some(live) = cached::<K>(writer.owned, namespace, name).await? else {
        return Ok(());
    };
    if live.meta().deletion_timestamp.is_some() {
        return Ok(());
    }
    if writer.lease_lapsed() {
        return Err(ApplyError::NotLeader);
    }
    let kind = K::kind(&());
    debug!(%kind, %namespace, %name, "deleting an object the spec no longer wants");
    writer.metrics.observe_delete(&kind);
    delete_if_exists::<K>(writer.client, namespace, name).await
}

/// Deletes `name` if it exists.
///
/// # Errors
/// [`ApplyError::Delete`] for anything but NotFound.
pub async fn delete_if_exists<K>(
    client: &Client,
    namespace: &str,
    name: &str,
) -> Result<(), ApplyError>
where
    K: Resource<DynamicType = (), Scope = NamespaceResourceScope>
        + DeserializeOwned
        + Clone
        + Debug,
{
    let api: Api<K> = Api::namespaced(client.clone(), namespace);
    match api.delete(name, &DeleteParams::background()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.code == 404 => Ok(()),
        Err(source) => Err(ApplyError::Delete {
            kind: kind_of::<K>(),
            namespace: namespace.to_string(),
            name: name.to_string(),
            source,
        }),
    }
}

/// Reads `name`, `None` when absent.
///
/// # Errors
/// [`ApplyError::Get`].
pub async fn get_opt<K>(
    client: &Client,
    namespace: &str,
    name: &str,
) -> Result<Option<K>, ApplyError>
where
    K: Resource<DynamicType = (), Scope = NamespaceResourceScope>
        + DeserializeOwned
        + Clone
        + Debug,
{
    let api: Api<K> = Api::namespaced(client.clone(), namespace);
    api.get_opt(name).await.map_err(|source| ApplyError::Get {
        kind: kind_of::<K>(),
        namespace: namespace.to_string(),
        name: name.to_string(),
        source,
    })
}

fn finalizers_with(mirror: &RegistryMirror, present: bool) -> Vec<String> {
    let mut list: Vec<String> = mirror
        .metadata
        .finalizers
        .clone()
        .unwrap_or_default()
        .into_iter()
        .filter(|f| f != FINALIZER)
        .collect();
    if present {
        list.push(FINALIZER.to_string());
    }
    list
}

/// Whether the mirror carries the operator's finalizer.
#[must_use]
pub fn has_finalizer(mirror: &RegistryMirror) -> bool {
    mirror
        .metadata
        .finalizers
        .as_ref()
        .is_some_and(|f| f.iter().any(|x| x == FINALIZER))
}

/// Adds or removes the operator's finalizer with a merge patch guarded by `resourceVersion`.
/// Returns the updated object.
///
/// # Errors
/// [`ApplyError::Finalizer`] (including a conflict when the object changed meanwhile).
pub async fn set_finalizer(
    api: &Api<RegistryMirror>,
    mirror: &RegistryMirror,
    present: bool,
) -> Result<RegistryMirror, ApplyError> {
    let name = mirror.metadata.name.clone().unwrap_or_default();
    let patch = json!({
        "metadata": {
            "finalizers": finalizers_with(mirror, present),
            "resourceVersion": mirror.metadata.resource_version,
        }
    });
    api.patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map_err(|source| ApplyError::Finalizer {
            namespace: mirror.metadata.namespace.clone().unwrap_or_default(),
            name,
            source,
        })
}
