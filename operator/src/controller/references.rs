//! Reference check: every object a mirror's registry pods mount by name must exist in the
//! mirror's namespace before registry objects are applied, because a pod that mounts a missing
//! Secret or ConfigMap hangs in `ContainerCreating` and says nothing useful. The references are
//! the credentials Secrets (`spec.registries[].credentialsSecret.name`,
//! `spec.storage.s3.credentialsSecretRef.name`, the bearer tokens
//! `spec.parent.auth.bearerTokenSecret.name` and `spec.tls.clientAuth.bearerTokenSecret.name`),
//! the CA ConfigMaps (`spec.registries[].caConfigMap.name`, `spec.parent.caConfigMap.name`) and
//! the TLS Secrets (`spec.tls.secretName`, `spec.parent.tls.clientCertSecret.name`, and
//! `spec.tls.clientAuth.nodeClientCertSecret.name`, which the node agents mount).
//!
//! Invariants:
//! - Only metadata is read (a `PartialObjectMetadata` GET): the operator never sees credentials
//!   or CA bundles, and needs `get` on Secrets and ConfigMaps, no `list` or `watch`.
//! - Existence is all that is checked: whether a Secret's keys match its `type`, or a ConfigMap
//!   holds the named key with valid PEM, cannot be seen from metadata and is left to the kubelet
//!   (a missing key keeps the pod in `ContainerCreating` with an Event) and the registry.
//! - There is no watch of these objects: a mirror waiting for one is looked at again every
//!   requeue period, so creating it is noticed within that period.
//! - The list of references (in spec field order) and the messages are pure functions.

use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::api::Api;
use kube::Client;

use crate::api::RegistryMirror;

/// Failure to check that a referenced object exists (a transient reconcile error).
#[derive(Debug, thiserror::Error)]
pub enum CheckReferencesError {
    /// Reading the object's metadata failed for another reason than absence.
    #[error("cannot check {field}: reading {kind} {namespace}/{name}: {source}", kind = .reference.object_kind())]
    Read {
        /// What the object is for.
        reference: Referenced,
        /// JSON path of the field naming the object.
        field: String,
        /// Namespace of the object.
        namespace: String,
        /// Name of the object.
        name: String,
        /// API error.
        #[source]
        source: kube::Error,
    },
}

impl CheckReferencesError {
    /// The static category used in metrics labels and Event reasons.
    #[must_use]
    pub fn category(&self) -> &'static str {
        match self {
            Self::Read { reference, .. } => reference.check_category(),
        }
    }
}

/// What a referenced object is for, which decides its kind and the reasons reported about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Referenced {
    /// A Secret with upstream credentials.
    CredentialsSecret,
    /// A ConfigMap with PEM CA certificates.
    CaConfigMap,
    /// A `kubernetes.io/tls` Secret (the mirror's certificate, or a client certificate).
    TlsSecret,
}

impl Referenced {
    /// The Kubernetes kind of the object.
    #[must_use]
    pub fn object_kind(self) -> &'static str {
        match self {
            Self::CredentialsSecret | Self::TlsSecret => "Secret",
            Self::CaConfigMap => "ConfigMap",
        }
    }

    /// The `Ready` reason while such an object is missing.
    #[must_use]
    pub fn missing_reason(self) -> &'static str {
        match self {
            Self::CredentialsSecret => "CredentialsSecretMissing",
            Self::CaConfigMap => "CaConfigMapMissing",
            Self::TlsSecret => "TlsSecretMissing",
        }
    }

    /// The failure category when the check itself fails.
    #[must_use]
    pub fn check_category(self) -> &'static str {
        match self {
            Self::CredentialsSecret => "CredentialsCheckFailed",
            Self::CaConfigMap => "CaConfigMapCheckFailed",
            Self::TlsSecret => "TlsSecretCheckFailed",
        }
    }
}

/// One object a mirror's registry pods need.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectRef {
    /// What it is for.
    pub referenced: Referenced,
    /// JSON path of the field naming it, e.g. `spec.registries[1].credentialsSecret.name`.
    pub field: String,
    /// Name of the object.
    pub name: String,
}

/// A referenced object that does not exist.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MissingObject {
    /// What it is for.
    pub referenced: Referenced,
    /// `field: Kind "name" not found in namespace "ns"`.
    pub message: String,
}

/// The objects named by the mirror, in spec field order: per registry its credentials Secret,
/// then its CA ConfigMap; then the parent's CA ConfigMap, client certificate Secret and token
/// Secret; then the mirror's TLS Secret, client token Secret and node client certificate
/// Secret; then the S3 credentials Secret.
#[must_use]
pub fn referenced_objects(mirror: &RegistryMirror) -> Vec<ObjectRef> {
    let mut refs = Vec::new();
    for (i, r) in mirror.spec.registries.iter().enumerate() {
        if let Some(secret) = &r.credentials_secret {
            refs.push(ObjectRef {
                referenced: Referenced::CredentialsSecret,
                field: format!("spec.registries[{i}].credentialsSecret.name"),
                name: secret.name.clone(),
            });
        }
        if let Some(ca) = &r.ca_config_map {
            refs.push(ObjectRef {
                referenced: Referenced::CaConfigMap,
                field: format!("spec.registries[{i}].caConfigMap.name"),
                name: ca.name.clone(),
            });
        }
    }
    let mut push = |referenced, field: &str, name: &str| {
        refs.push(ObjectRef {
            referenced,
            field: field.to_string(),
            name: name.to_string(),
        });
    };
    if let Some(parent) = &mirror.spec.parent {
        if let Some(ca) = &parent.ca_config_map {
            push(
                Referenced::CaConfigMap,
                "spec.parent.caConfigMap.name",
                &ca.name,
            );
        }
        if let Some(tls) = &parent.tls {
            push(
                Referenced::TlsSecret,
                "spec.parent.tls.clientCertSecret.name",
                &tls.client_cert_secret.name,
            );
        }
        if let Some(auth) = &parent.auth {
            push(
                Referenced::CredentialsSecret,
                "spec.parent.auth.bearerTokenSecret.name",
                &auth.bearer_token_secret.name,
            );
        }
    }
    if let Some(tls) = &mirror.spec.tls {
        push(
            Referenced::TlsSecret,
            "spec.tls.secretName",
            &tls.secret_name,
        );
        if let Some(token) = tls
            .client_auth
            .as_ref()
            .and_then(|a| a.bearer_token_secret.as_ref())
        {
            push(
                Referenced::CredentialsSecret,
                "spec.tls.clientAuth.bearerTokenSecret.name",
                &token.name,
            );
        }
        if let Some(node) = tls
            .client_auth
            .as_ref()
            .and_then(|a| a.node_client_cert_secret.as_ref())
        {
            push(
                Referenced::TlsSecret,
                "spec.tls.clientAuth.nodeClientCertSecret.name",
                &node.name,
            );
        }
    }
    if let Some(secret) = mirror
        .spec
        .storage
        .s3
        .as_ref()
        .and_then(|s3| s3.credentials_secret_ref.as_ref())
    {
        refs.push(ObjectRef {
            referenced: Referenced::CredentialsSecret,
            field: "spec.storage.s3.credentialsSecretRef.name".to_string(),
            name: secret.name.clone(),
        });
    }
    refs
}

/// What status says about a missing object.
#[must_use]
pub fn missing_message(object: &ObjectRef, namespace: &str) -> String {
    format!(
        "{}: {} {:?} not found in namespace {namespace:?}",
        object.field,
        object.referenced.object_kind(),
        object.name
    )
}

/// The objects in `refs` that do not exist in `namespace`, in the order given (empty when all
/// exist). Reads each object's metadata once.
///
/// # Errors
/// [`CheckReferencesError::Read`] when the API refuses or fails (other than 404).
pub async fn missing_objects(
    client: &Client,
    namespace: &str,
    refs: &[ObjectRef],
) -> Result<Vec<MissingObject>, CheckReferencesError> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    let mut missing = Vec::new();
    for object in refs {
        let found = match object.referenced {
            Referenced::CredentialsSecret | Referenced::TlsSecret => secrets
                .get_metadata_opt(&object.name)
                .await
                .map(|found| found.is_some()),
            Referenced::CaConfigMap => config_maps
                .get_metadata_opt(&object.name)
                .await
                .map(|found| found.is_some()),
        }
        .map_err(|source| CheckReferencesError::Read {
            reference: object.referenced,
            field: object.field.clone(),
            namespace: namespace.to_string(),
            name: object.name.clone(),
            source,
        })?;
        if !found {
            missing.push(MissingObject {
                referenced: object.referenced,
                message: missing_message(object, namespace),
            });
        }
    }
    Ok(missing)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;
    use serde_json::json;

    fn mirror(spec: serde_json::Value) -> RegistryMirror {
        serde_json::from_value(json!({
            "apiVersion": "cachalot.dev/v1alpha1", "kind": "RegistryMirror",
            "metadata": {"name": "hub", "namespace": "team-a"},
            "spec": spec
        }))
        .unwrap()
    }

    fn secret(field: &str, name: &str) -> ObjectRef {
        ObjectRef {
            referenced: Referenced::CredentialsSecret,
            field: field.into(),
            name: name.into(),
        }
    }

    fn config_map(field: &str, name: &str) -> ObjectRef {
        ObjectRef {
            referenced: Referenced::CaConfigMap,
            field: field.into(),
            name: name.into(),
        }
    }

    #[test]
    fn only_registries_with_credentials_name_a_secret_with_their_field() {
        let m = mirror(json!({"registries": [
            {"name": "quay.io"},
            {"name": "docker.io", "credentialsSecret": {"name": "hub-creds"}},
            {"name": "ghcr.io", "credentialsSecret": {"name": "gh", "type": "DockerConfigJson"}}
        ]}));
        assert_eq!(
            referenced_objects(&m),
            [
                secret("spec.registries[1].credentialsSecret.name", "hub-creds"),
                secret("spec.registries[2].credentialsSecret.name", "gh"),
            ]
        );
        assert!(
            referenced_objects(&mirror(json!({"registries": [{"name": "docker.io"}]}))).is_empty()
        );
    }

    #[test]
    fn ca_config_maps_of_registries_and_parent_are_referenced_in_field_order() {
        let m = mirror(json!({
            "registries": [
                {"name": "registry.corp.example", "caConfigMap": {"name": "corp-ca"},
                 "credentialsSecret": {"name": "corp-creds"}},
                {"name": "docker.io"}
            ],
            "parent": {"url": "https://hub.corp.example:30500",
                       "caConfigMap": {"name": "hub-ca", "key": "bundle.pem"}}
        }));
        assert_eq!(
            referenced_objects(&m),
            [
                secret("spec.registries[0].credentialsSecret.name", "corp-creds"),
                config_map("spec.registries[0].caConfigMap.name", "corp-ca"),
                config_map("spec.parent.caConfigMap.name", "hub-ca"),
            ]
        );
    }

    #[test]
    fn the_s3_credentials_secret_comes_last_in_field_order() {
        let m = mirror(json!({
            "registries": [{"name": "docker.io", "credentialsSecret": {"name": "hub-creds"}}],
            "storage": {"type": "S3", "s3": {"bucket": "cachalot",
                        "credentialsSecretRef": {"name": "s3-creds"}}}
        }));
        assert_eq!(
            referenced_objects(&m),
            [
                secret("spec.registries[0].credentialsSecret.name", "hub-creds"),
                secret("spec.storage.s3.credentialsSecretRef.name", "s3-creds"),
            ]
        );
        let ambient = mirror(json!({
            "registries": [{"name": "docker.io"}],
            "storage": {"type": "S3", "s3": {"bucket": "cachalot"}}
        }));
        assert!(
            referenced_objects(&ambient).is_empty(),
            "ambient credentials name no Secret"
        );
    }

    #[test]
    fn tls_and_token_secrets_of_parent_and_mirror_are_referenced_in_field_order() {
        let m = mirror(json!({
            "registries": [{"name": "docker.io"}],
            "parent": {"url": "https://hub.corp.example:30500",
                       "caConfigMap": {"name": "hub-ca"},
                       "tls": {"clientCertSecret": {"name": "spoke-client"}},
                       "auth": {"bearerTokenSecret": {"name": "hub-token", "key": "token"}}},
            "tls": {"secretName": "mirror-tls",
                    "clientAuth": {"caSecretKey": "ca.crt",
                                   "bearerTokenSecret": {"name": "clients", "key": "token"},
                                   "nodeClientCertSecret": {"name": "nodes"}}},
            "storage": {"type": "S3", "s3": {"bucket": "cachalot",
                        "credentialsSecretRef": {"name": "s3-creds"}}}
        }));
        let tls = |field: &str, name: &str| ObjectRef {
            referenced: Referenced::TlsSecret,
            field: field.into(),
            name: name.into(),
        };
        assert_eq!(
            referenced_objects(&m),
            [
                config_map("spec.parent.caConfigMap.name", "hub-ca"),
                tls("spec.parent.tls.clientCertSecret.name", "spoke-client"),
                secret("spec.parent.auth.bearerTokenSecret.name", "hub-token"),
                tls("spec.tls.secretName", "mirror-tls"),
                secret("spec.tls.clientAuth.bearerTokenSecret.name", "clients"),
                tls("spec.tls.clientAuth.nodeClientCertSecret.name", "nodes"),
                secret("spec.storage.s3.credentialsSecretRef.name", "s3-creds"),
            ]
        );
        assert_eq!(
            missing_message(&tls("spec.tls.secretName", "mirror-tls"), "team-a"),
            r#"spec.tls.secretName: Secret "mirror-tls" not found in namespace "team-a""#
        );
        assert_eq!(Referenced::TlsSecret.missing_reason(), "TlsSecretMissing");
        assert_eq!(
            Referenced::TlsSecret.check_category(),
            "TlsSecretCheckFailed"
        );
    }

    #[test]
    fn the_missing_message_names_the_field_the_kind_the_object_and_the_namespace() {
        assert_eq!(
            missing_message(
                &secret("spec.registries[1].credentialsSecret.name", "hub-creds"),
                "team-a"
            ),
            r#"spec.registries[1].credentialsSecret.name: Secret "hub-creds" not found in namespace "team-a""#
        );
        assert_eq!(
            missing_message(
                &config_map("spec.registries[0].caConfigMap.name", "corp-ca"),
                "team-a"
            ),
            r#"spec.registries[0].caConfigMap.name: ConfigMap "corp-ca" not found in namespace "team-a""#
        );
    }

    #[test]
    fn each_kind_of_reference_has_its_own_reason_and_failure_category() {
        assert_eq!(
            Referenced::CredentialsSecret.missing_reason(),
            "CredentialsSecretMissing"
        );
        assert_eq!(
            Referenced::CaConfigMap.missing_reason(),
            "CaConfigMapMissing"
        );
        assert_eq!(
            Referenced::CredentialsSecret.check_category(),
            "CredentialsCheckFailed"
        );
        assert_eq!(
            Referenced::CaConfigMap.check_category(),
            "CaConfigMapCheckFailed"
        );
    }
}
