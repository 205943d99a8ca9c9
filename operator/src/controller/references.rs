//! Credentials check: every Secret named by `spec.registries[].credentialsSecret.name` must exist
//! in the mirror's namespace before registry objects are applied, because a registry pod that
//! mounts a missing Secret hangs in `ContainerCreating` and says nothing useful.
//!
//! Invariants:
//! - Only the Secret's metadata is read (a `PartialObjectMetadata` GET): the operator never sees
//!   credentials, and needs `get` on Secrets, no `list` or `watch`.
//! - Existence is all that is checked: whether the Secret's keys match `type` (`username` and
//!   `password`, or `.dockerconfigjson`) cannot be seen from metadata and is left to the registry.
//! - There is no Secret watch: a mirror waiting for its Secret is looked at again every requeue
//!   period, so creating the Secret is noticed within that period.
//! - The list of Secrets to check and the messages are pure functions.

use k8s_openapi::api::core::v1::Secret;
use kube::api::Api;
use kube::Client;

use crate::api::RegistryMirror;

/// Failure to check a credentials Secret (a transient reconcile error).
#[derive(Debug, thiserror::Error)]
pub enum CheckCredentialsError {
    /// Reading the Secret's metadata failed for another reason than absence.
    #[error("cannot check {field}: reading Secret {namespace}/{name}: {source}")]
    Read {
        /// JSON path of the field naming the Secret.
        field: String,
        /// Namespace of the Secret.
        namespace: String,
        /// Name of the Secret.
        name: String,
        /// API error.
        #[source]
        source: kube::Error,
    },
}

impl CheckCredentialsError {
    /// The static category used in metrics labels and Event reasons.
    #[must_use]
    pub fn category(&self) -> &'static str {
        "CredentialsCheckFailed"
    }
}

/// One Secret a mirror's registries need.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretRef {
    /// JSON path of the field naming it, e.g. `spec.registries[1].credentialsSecret.name`.
    pub field: String,
    /// Name of the Secret.
    pub name: String,
}

/// The Secrets named by the mirror's registries, in spec order.
#[must_use]
pub fn credentials_secrets(mirror: &RegistryMirror) -> Vec<SecretRef> {
    mirror
        .spec
        .registries
        .iter()
        .enumerate()
        .filter_map(|(i, r)| {
            r.credentials_secret.as_ref().map(|s| SecretRef {
                field: format!("spec.registries[{i}].credentialsSecret.name"),
                name: s.name.clone(),
            })
        })
        .collect()
}

/// What status says about a missing Secret.
#[must_use]
pub fn missing_message(secret: &SecretRef, namespace: &str) -> String {
    format!(
        "{}: Secret {:?} not found in namespace {namespace:?}",
        secret.field, secret.name
    )
}

/// The messages for the Secrets in `secrets` that do not exist in `namespace`, in spec order
/// (empty when all exist). Reads each Secret's metadata once.
///
/// # Errors
/// [`CheckCredentialsError::Read`] when the API refuses or fails (other than 404).
pub async fn missing_secrets(
    client: &Client,
    namespace: &str,
    secrets: &[SecretRef],
) -> Result<Vec<String>, CheckCredentialsError> {
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let mut missing = Vec::new();
    for secret in secrets {
        let found = api.get_metadata_opt(&secret.name).await.map_err(|source| {
            CheckCredentialsError::Read {
                field: secret.field.clone(),
                namespace: namespace.to_string(),
                name: secret.name.clone(),
                source,
            }
        })?;
        if found.is_none() {
            missing.push(missing_message(secret, namespace));
        }
    }
    Ok(missing)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;
    use serde_json::json;

    fn mirror(registries: serde_json::Value) -> RegistryMirror {
        serde_json::from_value(json!({
            "apiVersion": "cachalot.dev/v1alpha1", "kind": "RegistryMirror",
            "metadata": {"name": "hub", "namespace": "team-a"},
            "spec": {"registries": registries}
        }))
        .unwrap()
    }

    #[test]
    fn only_registries_with_credentials_name_a_secret_with_their_field() {
        let m = mirror(json!([
            {"name": "quay.io"},
            {"name": "docker.io", "credentialsSecret": {"name": "hub-creds"}},
            {"name": "ghcr.io", "credentialsSecret": {"name": "gh", "type": "DockerConfigJson"}}
        ]));
        assert_eq!(
            credentials_secrets(&m),
            [
                SecretRef {
                    field: "spec.registries[1].credentialsSecret.name".into(),
                    name: "hub-creds".into()
                },
                SecretRef {
                    field: "spec.registries[2].credentialsSecret.name".into(),
                    name: "gh".into()
                },
            ]
        );
        assert!(credentials_secrets(&mirror(json!([{"name": "docker.io"}]))).is_empty());
    }

    #[test]
    fn the_missing_message_names_the_field_the_secret_and_the_namespace() {
        let secret = SecretRef {
            field: "spec.registries[1].credentialsSecret.name".into(),
            name: "hub-creds".into(),
        };
        assert_eq!(
            missing_message(&secret, "team-a"),
            r#"spec.registries[1].credentialsSecret.name: Secret "hub-creds" not found in namespace "team-a""#
        );
    }
}
