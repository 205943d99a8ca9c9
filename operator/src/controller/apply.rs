//! Apply stage: server-side apply of the built objects with one field manager, removal of
//! objects the spec no longer wants, and the finalizer patches.
//!
//! Invariants: every write uses field manager `cachalot-operator` with `force` (the operator owns
//! these objects outright); deletes of absent objects are not errors; finalizer changes carry the
//! object's `resourceVersion`, so a concurrent change makes them fail and retry instead of
//! clobbering another writer's list.

use std::fmt::Debug;

use k8s_openapi::NamespaceResourceScope;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::{Client, Resource};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::json;

use crate::api::{RegistryMirror, FINALIZER};

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
}

impl ApplyError {
    /// The static category used in metrics labels and Event reasons.
    #[must_use]
    pub fn category(&self) -> &'static str {
        match self {
            Self::Apply { .. } => "ApplyFailed",
            Self::Delete { .. } => "DeleteFailed",
            Self::Get { .. } => "GetFailed",
            Self::Finalizer { .. } => "FinalizerFailed",
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
