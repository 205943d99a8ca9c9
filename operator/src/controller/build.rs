//! Build stage: turns a validated `RegistryMirror` into the Kubernetes objects it owns.
//!
//! Invariants:
//! - Pure: no client, no clock, no randomness; the same input gives byte-identical objects, so
//!   their hash (the apply decision's `changed`, see `drift`) is stable and an unchanged mirror
//!   causes no apply.
//! - Every object carries the mirror's labels and a controller owner reference, so garbage
//!   collection removes it with the mirror.
//! - Credentials never enter a ConfigMap: the registry config holds only paths of files from
//!   mounted Secrets.
//! - CA ConfigMaps (`caConfigMap`) are mounted key by key and named in the registry config by
//!   path only; their content never enters the build, so a content change rolls nothing (the
//!   registry reads the file at start, so that needs a restart), while a change of the reference
//!   (name or key) changes the config hash and the pod template, and rolls the pods.
//! - Registry pods run non-root, read-only root filesystem, no capabilities, seccomp
//!   RuntimeDefault, writable volumes only for the cache and `/tmp`.
//! - Registry and agent containers use `terminationMessagePolicy: FallbackToLogsOnError`, so
//!   the reason a container exited (its last log lines) reaches the pod status and from there
//!   the mirror's `ProxyAvailable` condition.
//! - `S3` storage: one ConfigMap serves every replica. It lists every replica's URL as
//!   `cluster.peers` (stable StatefulSet pod names behind the headless `-peers` Service) and
//!   leaves `cluster.self` empty; each pod sets its own through `CACHALOT_CLUSTER_SELF`, built
//!   from its name (downward API). The S3 key pair is a mounted Secret, named by path only.
//! - TLS (`spec.tls`, `spec.parent.tls`, the bearer tokens of `clientAuth` and `parent.auth`):
//!   Secrets are mounted key by key (only the keys the registry reads), read-only, and named in
//!   the config by path only. The mirror's `ca.crt` reaches the nodes the same way: the agent
//!   pods mount that one key (optional) and install it beside `hosts.toml`, and so does the
//!   nodes' client certificate (`clientAuth.nodeClientCertSecret`: `tls.crt` and `tls.key`,
//!   mode 0400, agent pods only); the operator never reads a Secret's content. The admin
//!   listener (probes, `/stats`) stays plain HTTP.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;

use cachalot_registry::config::{
    ClientAuthConfig, ClusterConfig, Config as RegistryConfigFile, Credentials,
    FreshnessRule as RegistryFreshness, LogConfig, LogFormat, ParentConfig, RegistryConfig,
    S3Config, StorageConfig, TlsConfig,
};
use k8s_openapi::api::apps::v1::{
    DaemonSet, DaemonSetSpec, DaemonSetUpdateStrategy, Deployment, DeploymentSpec,
    RollingUpdateDaemonSet, StatefulSet, StatefulSetSpec,
};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMap, ConfigMapVolumeSource, Container, ContainerPort, EmptyDirVolumeSource,
    EnvVar, EnvVarSource, HTTPGetAction, HostPathVolumeSource, KeyToPath, ObjectFieldSelector,
    PersistentVolumeClaim, PersistentVolumeClaimSpec, PodSecurityContext, PodSpec, PodTemplateSpec,
    Probe, ResourceRequirements, SeccompProfile, SecretVolumeSource, SecurityContext, Service,
    ServicePort, ServiceSpec, Volume, VolumeMount, VolumeResourceRequirements,
};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::Resource;
use sha2::{Digest, Sha256};

use super::validate::{Exposure, ValidS3, ValidTls, Validated, TLS_CERT_KEY, TLS_KEY_KEY};
use super::workload_pins::WorkloadPins;
use crate::api::{
    CaConfigMapRef, CredentialsKind, FallbackPolicy, NodeRuntime, RegistryMirror, StorageKind,
};
use crate::node_agent::protocol::{self, DesiredRegistry, DesiredState};

/// Port of the registry's public listener (the pull API) inside its pod and on its Services.
pub const REGISTRY_PORT: i32 = 5000;
/// Port of the registry's admin listener (`/metrics`, `/stats`, `/admin/`, and the probes'
/// health endpoints), container port `admin`. No Service ever carries it: the operator reaches
/// it on the pods' IPs, Prometheus through the PodMonitor, so a NodePort or External hub never
/// exposes it.
pub const REGISTRY_ADMIN_PORT: i32 = 5001;
/// Name of the registry container's admin port.
pub const REGISTRY_ADMIN_PORT_NAME: &str = "admin";
/// Port the node agent serves `/status` on (hostNetwork, so on the node's IP).
pub const AGENT_PORT: i32 = 9464;
/// Key of the registry config in its ConfigMap.
pub const CONFIG_KEY: &str = "config.yaml";
/// Key of the workload pins in the registry config ConfigMap (`spec.pinWorkloadImages`).
/// Deliberately left out of the config hash: pins change as Pods come and go, and the registry
/// re-reads the file at each eviction pass, so they must not roll the registry Pods.
pub const PINS_KEY: &str = "pins.yaml";
/// Key of the agent's desired state in its ConfigMap.
pub const DESIRED_KEY: &str = "desired.json";
/// Label naming the owning mirror on every object and pod.
pub const MIRROR_LABEL: &str = "cachalot.dev/mirror";
/// Standard component label: `registry` or `node-agent`.
pub const COMPONENT_LABEL: &str = "app.kubernetes.io/component";
/// Pod template annotation carrying the config hash, so a config change rolls the pods.
pub const CONFIG_HASH_ANNOTATION: &str = "cachalot.dev/config-hash";

const CONFIG_DIR: &str = "/etc/cachalot/config";
/// Where the registry finds [`PINS_KEY`]: the config volume (a whole-directory ConfigMap mount,
/// which the kubelet updates in place; a `subPath` mount would never see an update).
pub const PIN_FILE_PATH: &str = "/etc/cachalot/config/pins.yaml";
const CREDENTIALS_DIR: &str = "/etc/cachalot/credentials";
const CA_DIR: &str = "/etc/cachalot/ca";
/// Where `spec.parent.caConfigMap` is mounted: outside [`CA_DIR`], because `parent` is also a
/// valid registry name.
pub const PARENT_CA_DIR: &str = "/etc/cachalot/parent-ca";
const STORAGE_DIR: &str = "/var/lib/cachalot";
/// Where `spec.storage.s3.credentialsSecretRef` is mounted.
pub const S3_CREDENTIALS_DIR: &str = "/etc/cachalot/s3";
/// Key of the S3 access key id in the credentials Secret (also its file name).
pub const S3_ACCESS_KEY_ID_KEY: &str = "access-key-id";
/// Key of the S3 secret access key in the credentials Secret (also its file name).
pub const S3_SECRET_ACCESS_KEY_KEY: &str = "secret-access-key";
/// How long a replica waits for a peer before serving a request itself (the registry's default).
const PEER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);
/// The environment variable the registry reads `cluster.self` from.
pub const CLUSTER_SELF_ENV: &str = "CACHALOT_CLUSTER_SELF";
/// Where `spec.tls.secretName` is mounted in the registry pods (`tls.crt`, `tls.key`, and the
/// client CA key of `clientAuth.caSecretKey`).
pub const TLS_DIR: &str = "/etc/cachalot/tls";
/// Where `spec.tls.clientAuth.bearerTokenSecret` is mounted in the registry pods.
pub const CLIENT_TOKEN_DIR: &str = "/etc/cachalot/client-auth";
/// Where `spec.parent.tls.clientCertSecret` is mounted in the registry pods.
pub const PARENT_TLS_DIR: &str = "/etc/cachalot/parent-tls";
/// Where `spec.parent.auth.bearerTokenSecret` is mounted in the registry pods.
pub const PARENT_TOKEN_DIR: &str = "/etc/cachalot/parent-token";
/// The key of the mirror's TLS Secret the node agents install as the CA nodes trust.
pub const MIRROR_CA_KEY: &str = "ca.crt";
/// Where the node agent pods mount [`MIRROR_CA_KEY`] of `spec.tls.secretName` (optional: a
/// Secret without it mounts nothing, and the nodes' system roots must trust the certificate).
pub const AGENT_MIRROR_CA_DIR: &str = "/etc/cachalot/mirror-ca";
/// Where the node agent pods mount `tls.crt` and `tls.key` of
/// `spec.tls.clientAuth.nodeClientCertSecret` (the registry pods never see it).
pub const AGENT_NODE_CLIENT_DIR: &str = "/etc/cachalot/node-client";
const AGENT_DESIRED_DIR: &str = "/etc/cachalot/agent";
const HOST_CERTS_DIR: &str = "/host/certs.d";
const HOST_CONTAINERD_DIR: &str = "/host/containerd";
const HOST_REGISTRIES_CONF_DIR: &str = "/host/registries.conf.d";
const HOST_DOCKER_CONFIG_DIR: &str = "/host/docker";
const HOST_RUNTIME_PID_FILE: &str = "/host/runtime.pid";

/// The runtime pid file the agent signals after changing the runtime's configuration:
/// `spec.nodes.runtimePidFile`, else dockerd's default for `Docker` (it reads a changed
/// daemon.json only on reload); none for containerd, which reads hosts.toml on every pull.
#[must_use]
pub fn runtime_pid_file(nodes: &crate::api::NodeSettings) -> Option<String> {
    match nodes.runtime {
        NodeRuntime::Containerd => None,
        NodeRuntime::Crio => nodes.runtime_pid_file.clone(),
        NodeRuntime::Docker => Some(
            nodes
                .runtime_pid_file
                .clone()
                .unwrap_or_else(|| "/var/run/docker.pid".to_string()),
        ),
    }
}
/// UID/GID of the registry process (the image's non-root user).
const REGISTRY_UID: i64 = 65532;
/// `terminationMessagePolicy` of the registry and agent containers: a container that fails
/// gets the tail of its log as `lastState.terminated.message`, which the status shows (the
/// binaries write no termination-log file, and their start-up errors go to the log).
pub const TERMINATION_MESSAGE_POLICY: &str = "FallbackToLogsOnError";

/// Failure to build the owned objects: the spec passed validation yet produced something the
/// registry or the API would refuse, which is a bug or a gap in validation.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// The rendered registry config does not pass the registry's own validation.
    #[error("rendered registry config is invalid: {0}")]
    RegistryConfig(#[source] cachalot_registry::config::ConfigError),
    /// Serialising the registry config or desired state failed.
    #[error("cannot serialise {what}: {message}")]
    Serialize {
        /// What was being serialised.
        what: &'static str,
        /// The serialiser's message.
        message: String,
    },
}

impl BuildError {
    /// The static category used in metrics labels and Event reasons.
    #[must_use]
    pub fn category(&self) -> &'static str {
        "BuildFailed"
    }
}

/// Settings of the operator that shape every mirror's objects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildConfig {
    /// Default image of the registry and agent pods (`--image`).
    pub image: String,
    /// This cluster's name (`--cluster-name`), the first part of a spoke's default id.
    pub cluster_name: Option<String>,
}

/// The registry side of a mirror. Absent for `service.type: External`.
#[derive(Debug, Clone, PartialEq)]
pub struct RegistryObjects {
    /// The registry config (`config.yaml`).
    pub config_map: ConfigMap,
    /// Deployment (emptyDir storage) or StatefulSet (PVC or S3 storage).
    pub workload: Workload,
    /// ClusterIP or NodePort Service.
    pub service: Service,
    /// The headless Service naming each replica for its peers (`S3` storage only).
    pub peers_service: Option<Service>,
    /// Present when replicas > 1.
    pub pdb: Option<PodDisruptionBudget>,
}

/// The registry workload kind.
#[derive(Debug, Clone, PartialEq)]
pub enum Workload {
    /// emptyDir cache.
    Deployment(Box<Deployment>),
    /// One PVC per pod, or S3 storage (stable pod names for the peers, an emptyDir read cache).
    StatefulSet(Box<StatefulSet>),
}

/// The node side of a mirror.
#[derive(Debug, Clone, PartialEq)]
pub struct AgentObjects {
    /// The desired state as the agent reads it.
    pub desired: DesiredState,
    /// ConfigMap holding `desired.json`.
    pub config_map: ConfigMap,
    /// The agent DaemonSet.
    pub daemon_set: DaemonSet,
}

/// Name of the registry Deployment/StatefulSet, Service and PDB.
#[must_use]
pub fn registry_name(mirror: &str) -> String {
    format!("cachalot-{mirror}")
}
/// The spoke id of a mirror whose `spec.parent.spokeId` is unset: `<cluster>/<namespace>/<name>`
/// with the operator's `--cluster-name`, else `<namespace>/<name>` (the same in every cluster that
/// applies the same manifest), cut to the 128 characters a spoke id may have.
#[must_use]
pub fn default_spoke_id(v: &Validated, cluster_name: Option<&str>) -> String {
    let local = format!("{}/{}", v.namespace, v.name);
    cluster_name
        .map_or(local.clone(), |cluster| format!("{cluster}/{local}"))
        .chars()
        .take(cachalot_registry::fleet::MAX_SPOKE_ID_LEN)
        .collect()
}

/// Name of the registry config ConfigMap.
#[must_use]
pub fn registry_config_name(mirror: &str) -> String {
    format!("cachalot-{mirror}-config")
}
/// Name of the headless Service of an S3 mirror's replicas (the StatefulSet's `serviceName`).
#[must_use]
pub fn peers_service_name(mirror: &str) -> String {
    format!("cachalot-{mirror}-peers")
}

/// Base URL of one replica as its peers reach it: the StatefulSet pod's DNS name under the
/// headless Service. `pod` is the pod name, or `$(POD_NAME)` for the container environment.
#[must_use]
pub fn peer_url(v: &Validated, pod: &str) -> String {
    format!(
        "http://{pod}.{}.{}.svc:{REGISTRY_PORT}",
        peers_service_name(&v.name),
        v.namespace
    )
}

/// Every replica's URL (`cachalot-NAME-0` .. `cachalot-NAME-<replicas-1>`), in ordinal order.
#[must_use]
pub fn peer_urls(v: &Validated, replicas: i32) -> Vec<String> {
    (0..replicas.max(1))
        .map(|i| peer_url(v, &format!("{}-{i}", registry_name(&v.name))))
        .collect()
}

/// Name of the agent DaemonSet and its desired-state ConfigMap.
#[must_use]
pub fn agent_name(mirror: &str) -> String {
    format!("cachalot-{mirror}-agent")
}

/// Labels selecting one component's pods of one mirror (also the immutable selector).
#[must_use]
pub fn selector_labels(mirror: &str, component: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".to_string(), "cachalot".to_string()),
        ("app.kubernetes.io/instance".to_string(), mirror.to_string()),
        (COMPONENT_LABEL.to_string(), component.to_string()),
    ])
}

/// The label selector string for listing one component's pods, e.g. for `/stats` scraping.
#[must_use]
pub fn selector_string(mirror: &str, component: &str) -> String {
    selector_labels(mirror, component)
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

fn object_labels(mirror: &str, component: &str) -> BTreeMap<String, String> {
    let mut labels = selector_labels(mirror, component);
    labels.insert(
        "app.kubernetes.io/managed-by".to_string(),
        "cachalot-operator".to_string(),
    );
    labels.insert(MIRROR_LABEL.to_string(), mirror.to_string());
    labels
}

fn owner_reference(v: &Validated) -> OwnerReference {
    OwnerReference {
        api_version: RegistryMirror::api_version(&()).into_owned(),
        kind: RegistryMirror::kind(&()).into_owned(),
        name: v.name.clone(),
        uid: v.uid.clone(),
        controller: Some(true),
        block_owner_deletion: Some(true),
    }
}

fn meta(v: &Validated, name: String, component: &str) -> ObjectMeta {
    ObjectMeta {
        name: Some(name),
        namespace: Some(v.namespace.clone()),
        labels: Some(object_labels(&v.name, component)),
        owner_references: Some(vec![owner_reference(v)]),
        ..ObjectMeta::default()
    }
}

fn short_hash(bytes: &[u8]) -> String {
    let digest = Sha256::digest(bytes);
    hex::encode(&digest[..8])
}

/// Directory under which one registry's credentials Secret is mounted (`:` of a port is kept
/// out of paths).
#[must_use]
pub fn credentials_dir(registry: &str) -> String {
    format!("{CREDENTIALS_DIR}/{}", registry.replace(':', "_"))
}

/// Directory under which one registry's CA ConfigMap key is mounted (`:` of a port is kept out
/// of paths, as for credentials).
#[must_use]
pub fn ca_dir(registry: &str) -> String {
    format!("{CA_DIR}/{}", registry.replace(':', "_"))
}

/// The CA file the registry reads: the ConfigMap's key, mounted in `dir` under its own name.
fn ca_file(dir: &str, ca: &CaConfigMapRef) -> PathBuf {
    PathBuf::from(format!("{dir}/{}", ca.key))
}

/// A read-only ConfigMap volume with the CA key alone (other keys of the ConfigMap are not
/// projected), and its mount at `dir`. Not a `subPath` mount, so the kubelet keeps the file up
/// to date (the registry still reads it only when it starts).
fn ca_volume(volume: String, ca: &CaConfigMapRef, dir: String) -> (Volume, VolumeMount) {
    (
        Volume {
            name: volume.clone(),
            config_map: Some(ConfigMapVolumeSource {
                name: ca.name.clone(),
                items: Some(vec![KeyToPath {
                    key: ca.key.clone(),
                    path: ca.key.clone(),
                    ..KeyToPath::default()
                }]),
                ..ConfigMapVolumeSource::default()
            }),
            ..Volume::default()
        },
        VolumeMount {
            name: volume,
            mount_path: dir,
            read_only: Some(true),
            ..VolumeMount::default()
        },
    )
}

/// A read-only Secret volume with only `keys` projected (each under its own name), and its
/// mount at `dir`. `optional`: a missing Secret or key mounts nothing instead of keeping the
/// pod from starting.
fn secret_keys_volume(
    volume: &str,
    secret: &str,
    keys: &[&str],
    dir: &str,
    optional: bool,
) -> (Volume, VolumeMount) {
    secret_keys_volume_with_mode(volume, secret, keys, dir, optional, 0o440)
}

/// [`secret_keys_volume`] with the files' `mode` (0400 for a key only the root agent reads).
fn secret_keys_volume_with_mode(
    volume: &str,
    secret: &str,
    keys: &[&str],
    dir: &str,
    optional: bool,
    mode: i32,
) -> (Volume, VolumeMount) {
    let mut items: Vec<KeyToPath> = Vec::new();
    for key in keys {
        if !items.iter().any(|i| i.key == *key) {
            items.push(KeyToPath {
                key: (*key).to_string(),
                path: (*key).to_string(),
                ..KeyToPath::default()
            });
        }
    }
    (
        Volume {
            name: volume.to_string(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(secret.to_string()),
                items: Some(items),
                default_mode: Some(mode),
                optional: optional.then_some(true),
                ..SecretVolumeSource::default()
            }),
            ..Volume::default()
        },
        mount(volume, dir, true),
    )
}

/// The TLS and token Secret volumes of the registry pods, in spec field order: the parent's
/// client certificate and token, then the mirror's certificate (with the client CA key) and
/// the clients' token.
fn tls_volumes(mirror: &RegistryMirror, v: &Validated) -> Vec<(Volume, VolumeMount)> {
    let mut out = Vec::new();
    if let Some(parent) = &mirror.spec.parent {
        if let Some(tls) = &parent.tls {
            out.push(secret_keys_volume(
                "parent-tls",
                &tls.client_cert_secret.name,
                &[TLS_CERT_KEY, TLS_KEY_KEY],
                PARENT_TLS_DIR,
                false,
            ));
        }
        if let Some(auth) = &parent.auth {
            let token = &auth.bearer_token_secret;
            out.push(secret_keys_volume(
                "parent-token",
                &token.name,
                &[&token.key],
                PARENT_TOKEN_DIR,
                false,
            ));
        }
    }
    if let Some(tls) = &v.tls {
        let mut keys = vec![TLS_CERT_KEY, TLS_KEY_KEY];
        keys.extend(tls.client_ca_key.as_deref());
        out.push(secret_keys_volume(
            "tls",
            &tls.secret_name,
            &keys,
            TLS_DIR,
            false,
        ));
        if let Some(token) = &tls.bearer_token {
            out.push(secret_keys_volume(
                "client-token",
                &token.name,
                &[&token.key],
                CLIENT_TOKEN_DIR,
                false,
            ));
        }
    }
    out
}

/// The TLS and token Secret references, one line each (empty without any), for the config
/// hash: the config names the mounted files, not the Secrets they come from, so renaming a
/// Secret must still roll the pods.
fn tls_references(mirror: &RegistryMirror, v: &Validated) -> String {
    let mut lines = String::new();
    if let Some(parent) = &mirror.spec.parent {
        if let Some(tls) = &parent.tls {
            lines.push_str(&format!(
                "\nspec.parent.tls.clientCertSecret {}",
                tls.client_cert_secret.name
            ));
        }
        if let Some(auth) = &parent.auth {
            let t = &auth.bearer_token_secret;
            lines.push_str(&format!(
                "\nspec.parent.auth.bearerTokenSecret {}/{}",
                t.name, t.key
            ));
        }
    }
    if let Some(tls) = &v.tls {
        lines.push_str(&format!("\nspec.tls.secretName {}", tls.secret_name));
        if let Some(t) = &tls.bearer_token {
            lines.push_str(&format!(
                "\nspec.tls.clientAuth.bearerTokenSecret {}/{}",
                t.name, t.key
            ));
        }
    }
    lines
}

/// The registry's `tls` and `auth` sections for `spec.tls`.
fn listener_tls(tls: &ValidTls) -> (TlsConfig, Option<ClientAuthConfig>) {
    let file = |key: &str| PathBuf::from(format!("{TLS_DIR}/{key}"));
    (
        TlsConfig {
            cert_file: file(TLS_CERT_KEY),
            key_file: file(TLS_KEY_KEY),
            client_ca_file: tls.client_ca_key.as_deref().map(file),
        },
        tls.bearer_token.as_ref().map(|t| ClientAuthConfig {
            bearer_token_file: PathBuf::from(format!("{CLIENT_TOKEN_DIR}/{}", t.key)),
        }),
    )
}

/// The CA ConfigMap references of a mirror, one line each in spec order (empty without any),
/// for the config hash: the config names the mounted file, not the ConfigMap it comes from.
fn ca_references(mirror: &RegistryMirror) -> String {
    let registries = mirror
        .spec
        .registries
        .iter()
        .enumerate()
        .filter_map(|(i, r)| {
            r.ca_config_map
                .as_ref()
                .map(|ca| (format!("spec.registries[{i}]"), ca))
        });
    let parent = mirror
        .spec
        .parent
        .as_ref()
        .and_then(|p| p.ca_config_map.as_ref())
        .map(|ca| ("spec.parent".to_string(), ca));
    registries
        .chain(parent)
        .map(|(field, ca)| format!("\n{field}.caConfigMap {}/{}", ca.name, ca.key))
        .collect()
}

/// The S3 credentials reference (one line, empty without one), for the config hash: the config
/// names the mounted files, not the Secret they come from.
fn s3_credentials_reference(s3: Option<&ValidS3>) -> String {
    s3.and_then(|s3| s3.credentials_secret.as_ref())
        .map(|name| format!("\nspec.storage.s3.credentialsSecretRef {name}"))
        .unwrap_or_default()
}

/// The registry's `storage.s3` for a validated bucket: key files under [`S3_CREDENTIALS_DIR`]
/// when a Secret is named, none for ambient credentials.
fn s3_config(s3: &ValidS3) -> S3Config {
    let key_file = |key: &str| {
        s3.credentials_secret
            .as_ref()
            .map(|_| PathBuf::from(format!("{S3_CREDENTIALS_DIR}/{key}")))
    };
    S3Config {
        endpoint: s3.endpoint.clone(),
        bucket: s3.bucket.clone(),
        region: s3.region.clone(),
        prefix: s3.prefix.clone(),
        access_key_id_file: key_file(S3_ACCESS_KEY_ID_KEY),
        secret_access_key_file: key_file(S3_SECRET_ACCESS_KEY_KEY),
        local_cache_max_size_bytes: Some(s3.local_cache_max_size_bytes),
        eviction_grace: None,
        owner: s3.owner.clone(),
    }
}

/// Renders the registry configuration for a validated mirror.
///
/// # Errors
/// [`BuildError::RegistryConfig`] when the registry's own validation refuses the result.
pub fn registry_config(
    mirror: &RegistryMirror,
    v: &Validated,
    cfg: &BuildConfig,
) -> Result<RegistryConfigFile, BuildError> {
    let mut registries = BTreeMap::new();
    for (spec_reg, valid) in mirror.spec.registries.iter().zip(&v.registries) {
        let credentials = spec_reg.credentials_secret.as_ref().map(|secret| {
            let dir = credentials_dir(&valid.name);
            match secret.kind {
                CredentialsKind::Basic => Credentials {
                    username_file: Some(PathBuf::from(format!("{dir}/username"))),
                    password_file: Some(PathBuf::from(format!("{dir}/password"))),
                    docker_config_file: None,
                },
                CredentialsKind::DockerConfigJson => Credentials {
                    username_file: None,
                    password_file: None,
                    docker_config_file: Some(PathBuf::from(format!("{dir}/.dockerconfigjson"))),
                },
            }
        });
        let freshness = valid
            .freshness
            .iter()
            .map(|f| RegistryFreshness {
                pattern: f.pattern.clone(),
                repository: None,
                max_age: f.max_age,
                immutable: f.immutable,
                not_found_max_age: None,
            })
            .collect();
        registries.insert(
            valid.name.clone(),
            RegistryConfig {
                url: Some(valid.url.clone()),
                credentials,
                freshness,
                pin: valid.pin.clone(),
                ca_file: spec_reg
                    .ca_config_map
                    .as_ref()
                    .map(|ca| ca_file(&ca_dir(&valid.name), ca)),
                budget_reserve: spec_reg
                    .budget_reserve
                    .and_then(|r| u64::try_from(r).ok())
                    .unwrap_or(0),
                ..RegistryConfig::default()
            },
        );
    }
    let listener = v.tls.as_ref().map(listener_tls);
    let config = RegistryConfigFile {
        listen: SocketAddr::from(([0, 0, 0, 0], port_u16(REGISTRY_PORT))),
        admin_listen: SocketAddr::from(([0, 0, 0, 0], port_u16(REGISTRY_ADMIN_PORT))),
        default_registry: v.default_registry.clone(),
        storage: StorageConfig {
            path: PathBuf::from(STORAGE_DIR),
            max_size_bytes: Some(v.max_size_bytes),
            s3: v.s3.as_ref().map(s3_config),
            ..StorageConfig::default()
        },
        // `self` stays empty: each pod sets it (`CACHALOT_CLUSTER_SELF`).
        cluster: v.s3.as_ref().map(|_| ClusterConfig {
            self_url: String::new(),
            peers: peer_urls(v, mirror.spec.replicas),
            peer_timeout: PEER_TIMEOUT,
        }),
        parent: mirror.spec.parent.as_ref().map(|p| ParentConfig {
            url: p.url.trim_end_matches('/').to_string(),
            ca_file: p
                .ca_config_map
                .as_ref()
                .map(|ca| ca_file(PARENT_CA_DIR, ca)),
            insecure_skip_verify: false,
            spoke_id: Some(
                p.spoke_id
                    .clone()
                    .unwrap_or_else(|| default_spoke_id(v, cfg.cluster_name.as_deref())),
            ),
            client_cert_file: p
                .tls
                .as_ref()
                .map(|_| PathBuf::from(format!("{PARENT_TLS_DIR}/{TLS_CERT_KEY}"))),
            client_key_file: p
                .tls
                .as_ref()
                .map(|_| PathBuf::from(format!("{PARENT_TLS_DIR}/{TLS_KEY_KEY}"))),
            bearer_token_file: p.auth.as_ref().map(|a| {
                PathBuf::from(format!("{PARENT_TOKEN_DIR}/{}", a.bearer_token_secret.key))
            }),
        }),
        registries,
        pin_file: mirror
            .spec
            .pin_workload_images
            .then(|| PathBuf::from(PIN_FILE_PATH)),
        log: LogConfig {
            format: LogFormat::Json,
            level: None,
        },
        tls: listener.as_ref().map(|(tls, _)| tls.clone()),
        auth: listener.and_then(|(_, auth)| auth),
        ..RegistryConfigFile::default()
    };
    // Validated as the first replica will load it, with its own `cluster.self`.
    let mut as_loaded = config.clone();
    if let Some(cluster) = &mut as_loaded.cluster {
        cluster.self_url = cluster.peers.first().cloned().unwrap_or_default();
    }
    as_loaded.validate().map_err(BuildError::RegistryConfig)?;
    Ok(config)
}

/// Builds the registry side: ConfigMap, workload, Service and PDB. `None` for an external
/// endpoint, where nothing runs in the cluster.
///
/// # Errors
/// [`BuildError`] when the registry config cannot be rendered.
pub fn build_registry(
    mirror: &RegistryMirror,
    v: &Validated,
    cfg: &BuildConfig,
) -> Result<Option<RegistryObjects>, BuildError> {
    if matches!(v.exposure, Exposure::External(_)) {
        return Ok(None);
    }
    let config = registry_config(mirror, v, cfg)?;
    let config_yaml = serde_yaml::to_string(&config).map_err(|e| BuildError::Serialize {
        what: "registry config",
        message: e.to_string(),
    })?;
    let config_map = ConfigMap {
        metadata: meta(v, registry_config_name(&v.name), "registry"),
        data: Some(BTreeMap::from([(
            CONFIG_KEY.to_string(),
            config_yaml.clone(),
        )])),
        ..ConfigMap::default()
    };
    let spec = &mirror.spec;
    let image = spec.image.clone().unwrap_or_else(|| cfg.image.clone());
    let mut hash_input = config_yaml.into_bytes();
    hash_input.extend(image.as_bytes());
    // Empty without CA ConfigMaps or an S3 Secret, so the hash of such mirrors is what it was
    // before.
    hash_input.extend(ca_references(mirror).as_bytes());
    hash_input.extend(s3_credentials_reference(v.s3.as_ref()).as_bytes());
    hash_input.extend(tls_references(mirror, v).as_bytes());
    let pod_template = registry_pod_template(mirror, v, image, &short_hash(&hash_input));
    let selector = LabelSelector {
        match_labels: Some(selector_labels(&v.name, "registry")),
        ..LabelSelector::default()
    };
    let workload = match spec.storage.kind {
        StorageKind::EmptyDir => Workload::Deployment(Box::new(Deployment {
            metadata: meta(v, registry_name(&v.name), "registry"),
            spec: DeploymentSpec {
                replicas: Some(spec.replicas),
                selector,
                template: pod_template,
                revision_history_limit: Some(3),
                ..DeploymentSpec::default()
            },
            ..Deployment::default()
        })),
        StorageKind::S3 => Workload::StatefulSet(Box::new(StatefulSet {
            metadata: meta(v, registry_name(&v.name), "registry"),
            spec: StatefulSetSpec {
                replicas: Some(spec.replicas),
                selector,
                service_name: Some(peers_service_name(&v.name)),
                pod_management_policy: Some("Parallel".to_string()),
                template: pod_template,
                revision_history_limit: Some(3),
                ..StatefulSetSpec::default()
            },
            ..StatefulSet::default()
        })),
        StorageKind::PersistentVolumeClaim => {
            let mut requests = BTreeMap::new();
            if let Some(size) = &spec.storage.size {
                requests.insert("storage".to_string(), size.clone());
            }
            Workload::StatefulSet(Box::new(StatefulSet {
                metadata: meta(v, registry_name(&v.name), "registry"),
                spec: StatefulSetSpec {
                    replicas: Some(spec.replicas),
                    selector,
                    service_name: Some(registry_name(&v.name)),
                    pod_management_policy: Some("Parallel".to_string()),
                    template: pod_template,
                    revision_history_limit: Some(3),
                    volume_claim_templates: Some(vec![PersistentVolumeClaim {
                        metadata: ObjectMeta {
                            name: Some("cache".to_string()),
                            labels: Some(selector_labels(&v.name, "registry")),
                            ..ObjectMeta::default()
                        },
                        spec: Some(PersistentVolumeClaimSpec {
                            access_modes: Some(vec!["ReadWriteOnce".to_string()]),
                            storage_class_name: spec.storage.storage_class_name.clone(),
                            resources: Some(VolumeResourceRequirements {
                                requests: Some(requests),
                                limits: None,
                            }),
                            ..PersistentVolumeClaimSpec::default()
                        }),
                        ..PersistentVolumeClaim::default()
                    }]),
                    ..StatefulSetSpec::default()
                },
                ..StatefulSet::default()
            }))
        }
    };
    let (service_type, node_port) = match v.exposure {
        Exposure::NodePort(port) => ("NodePort", port),
        _ => ("ClusterIP", None),
    };
    let service = Service {
        metadata: meta(v, registry_name(&v.name), "registry"),
        spec: Some(ServiceSpec {
            type_: Some(service_type.to_string()),
            selector: Some(selector_labels(&v.name, "registry")),
            ports: Some(vec![ServicePort {
                name: Some("http".to_string()),
                port: REGISTRY_PORT,
                target_port: Some(IntOrString::String("http".to_string())),
                protocol: Some("TCP".to_string()),
                node_port,
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    };
    // Not-ready pods are published too: peers find each other while they start, and a peer
    // that does not answer is skipped by the registry after its `peerTimeout`.
    let peers_service = v.s3.as_ref().map(|_| Service {
        metadata: meta(v, peers_service_name(&v.name), "registry"),
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".to_string()),
            publish_not_ready_addresses: Some(true),
            selector: Some(selector_labels(&v.name, "registry")),
            ports: Some(vec![ServicePort {
                name: Some("http".to_string()),
                port: REGISTRY_PORT,
                target_port: Some(IntOrString::String("http".to_string())),
                protocol: Some("TCP".to_string()),
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    });
    let pdb = (spec.replicas > 1).then(|| PodDisruptionBudget {
        metadata: meta(v, registry_name(&v.name), "registry"),
        spec: Some(PodDisruptionBudgetSpec {
            min_available: Some(IntOrString::Int(1)),
            selector: Some(LabelSelector {
                match_labels: Some(selector_labels(&v.name, "registry")),
                ..LabelSelector::default()
            }),
            ..PodDisruptionBudgetSpec::default()
        }),
        ..PodDisruptionBudget::default()
    });
    Ok(Some(RegistryObjects {
        config_map,
        workload,
        service,
        peers_service,
        pdb,
    }))
}

/// Renders the pin file: registry → pin list, `{}` when nothing is pinned.
///
/// # Errors
/// [`BuildError::Serialize`] when YAML serialisation fails (a bug).
pub fn render_pins(pins: &WorkloadPins) -> Result<String, BuildError> {
    serde_yaml::to_string(&pins.by_registry).map_err(|e| BuildError::Serialize {
        what: "workload pins",
        message: e.to_string(),
    })
}

/// [`build_registry`] with the workload pins added to the registry config ConfigMap under
/// [`PINS_KEY`] (outside the config hash, so a change of pins rolls nothing).
///
/// # Errors
/// [`BuildError`] when the registry config or the pins cannot be rendered.
pub fn build_registry_with_pins(
    mirror: &RegistryMirror,
    v: &Validated,
    cfg: &BuildConfig,
    pins: Option<&WorkloadPins>,
) -> Result<Option<RegistryObjects>, BuildError> {
    let mut objects = build_registry(mirror, v, cfg)?;
    if let (Some(objects), Some(pins)) = (objects.as_mut(), pins) {
        let rendered = render_pins(pins)?;
        objects
            .config_map
            .data
            .get_or_insert_with(BTreeMap::new)
            .insert(PINS_KEY.to_string(), rendered);
    }
    Ok(objects)
}

fn restricted_security_context(run_as_user: Option<i64>) -> SecurityContext {
    SecurityContext {
        run_as_non_root: Some(run_as_user.is_some_and(|u| u != 0)),
        run_as_user,
        run_as_group: run_as_user,
        read_only_root_filesystem: Some(true),
        allow_privilege_escalation: Some(false),
        privileged: Some(false),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".to_string()]),
            add: None,
        }),
        seccomp_profile: Some(SeccompProfile {
            type_: "RuntimeDefault".to_string(),
            localhost_profile: None,
        }),
        ..SecurityContext::default()
    }
}

fn default_registry_resources() -> ResourceRequirements {
    ResourceRequirements {
        requests: Some(BTreeMap::from([
            ("cpu".to_string(), Quantity("50m".to_string())),
            ("memory".to_string(), Quantity("64Mi".to_string())),
        ])),
        limits: Some(BTreeMap::from([(
            "memory".to_string(),
            Quantity("512Mi".to_string()),
        )])),
        ..ResourceRequirements::default()
    }
}

/// A port constant as a socket address port (the constants are small positive numbers).
const fn port_u16(port: i32) -> u16 {
    // Invariant: REGISTRY_PORT and REGISTRY_ADMIN_PORT are within 1..=65535.
    port as u16
}

fn http_probe(path: &str, port: &str, period: i32, failures: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.to_string()),
            port: IntOrString::String(port.to_string()),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period),
        timeout_seconds: Some(2),
        failure_threshold: Some(failures),
        ..Probe::default()
    }
}

fn registry_pod_template(
    mirror: &RegistryMirror,
    v: &Validated,
    image: String,
    config_hash: &str,
) -> PodTemplateSpec {
    let spec = &mirror.spec;
    let mut volumes = vec![
        Volume {
            name: "config".to_string(),
            config_map: Some(ConfigMapVolumeSource {
                name: registry_config_name(&v.name),
                ..ConfigMapVolumeSource::default()
            }),
            ..Volume::default()
        },
        Volume {
            name: "tmp".to_string(),
            empty_dir: Some(EmptyDirVolumeSource {
                size_limit: Some(Quantity("1Gi".to_string())),
                ..EmptyDirVolumeSource::default()
            }),
            ..Volume::default()
        },
    ];
    let mut mounts = vec![
        VolumeMount {
            name: "config".to_string(),
            mount_path: CONFIG_DIR.to_string(),
            read_only: Some(true),
            ..VolumeMount::default()
        },
        VolumeMount {
            name: "tmp".to_string(),
            mount_path: "/tmp".to_string(),
            ..VolumeMount::default()
        },
        VolumeMount {
            name: "cache".to_string(),
            mount_path: STORAGE_DIR.to_string(),
            ..VolumeMount::default()
        },
    ];
    match (&v.s3, spec.storage.kind) {
        (Some(s3), _) => {
            volumes.push(Volume {
                name: "cache".to_string(),
                empty_dir: Some(EmptyDirVolumeSource {
                    size_limit: Some(s3.local_cache_size.clone()),
                    ..EmptyDirVolumeSource::default()
                }),
                ..Volume::default()
            });
            if let Some(secret) = &s3.credentials_secret {
                volumes.push(Volume {
                    name: "s3-credentials".to_string(),
                    secret: Some(SecretVolumeSource {
                        secret_name: Some(secret.clone()),
                        default_mode: Some(0o440),
                        ..SecretVolumeSource::default()
                    }),
                    ..Volume::default()
                });
                mounts.push(VolumeMount {
                    name: "s3-credentials".to_string(),
                    mount_path: S3_CREDENTIALS_DIR.to_string(),
                    read_only: Some(true),
                    ..VolumeMount::default()
                });
            }
        }
        (None, StorageKind::EmptyDir) => volumes.push(Volume {
            name: "cache".to_string(),
            empty_dir: Some(EmptyDirVolumeSource {
                size_limit: spec.storage.size.clone(),
                ..EmptyDirVolumeSource::default()
            }),
            ..Volume::default()
        }),
        (None, _) => {}
    }
    for (i, registry) in spec.registries.iter().enumerate() {
        if let Some(secret) = &registry.credentials_secret {
            let name = format!("credentials-{i}");
            volumes.push(Volume {
                name: name.clone(),
                secret: Some(SecretVolumeSource {
                    secret_name: Some(secret.name.clone()),
                    default_mode: Some(0o440),
                    ..SecretVolumeSource::default()
                }),
                ..Volume::default()
            });
            mounts.push(VolumeMount {
                name,
                mount_path: credentials_dir(&registry.name),
                read_only: Some(true),
                ..VolumeMount::default()
            });
        }
        if let Some(ca) = &registry.ca_config_map {
            let (volume, mount) = ca_volume(format!("ca-{i}"), ca, ca_dir(&registry.name));
            volumes.push(volume);
            mounts.push(mount);
        }
    }
    if let Some(ca) = spec.parent.as_ref().and_then(|p| p.ca_config_map.as_ref()) {
        let (volume, mount) = ca_volume("parent-ca".to_string(), ca, PARENT_CA_DIR.to_string());
        volumes.push(volume);
        mounts.push(mount);
    }
    for (volume, mount) in tls_volumes(mirror, v) {
        volumes.push(volume);
        mounts.push(mount);
    }
    PodTemplateSpec {
        metadata: Some(ObjectMeta {
            labels: Some(object_labels(&v.name, "registry")),
            annotations: Some(BTreeMap::from([(
                CONFIG_HASH_ANNOTATION.to_string(),
                config_hash.to_string(),
            )])),
            ..ObjectMeta::default()
        }),
        spec: Some(PodSpec {
            automount_service_account_token: Some(false),
            enable_service_links: Some(false),
            security_context: Some(PodSecurityContext {
                run_as_non_root: Some(true),
                run_as_user: Some(REGISTRY_UID),
                run_as_group: Some(REGISTRY_UID),
                fs_group: Some(REGISTRY_UID),
                seccomp_profile: Some(SeccompProfile {
                    type_: "RuntimeDefault".to_string(),
                    localhost_profile: None,
                }),
                ..PodSecurityContext::default()
            }),
            containers: vec![Container {
                name: "registry".to_string(),
                image: Some(image),
                command: Some(vec!["/usr/local/bin/cachalot-registry".to_string()]),
                args: Some(vec![
                    "serve".to_string(),
                    "--config".to_string(),
                    format!("{CONFIG_DIR}/{CONFIG_KEY}"),
                ]),
                ports: Some(vec![
                    ContainerPort {
                        name: Some("http".to_string()),
                        container_port: REGISTRY_PORT,
                        protocol: Some("TCP".to_string()),
                        ..ContainerPort::default()
                    },
                    ContainerPort {
                        name: Some(REGISTRY_ADMIN_PORT_NAME.to_string()),
                        container_port: REGISTRY_ADMIN_PORT,
                        protocol: Some("TCP".to_string()),
                        ..ContainerPort::default()
                    },
                ]),
                readiness_probe: Some(http_probe("/readyz", REGISTRY_ADMIN_PORT_NAME, 5, 3)),
                liveness_probe: Some(Probe {
                    initial_delay_seconds: Some(5),
                    ..http_probe("/healthz", REGISTRY_ADMIN_PORT_NAME, 10, 6)
                }),
                resources: Some(
                    spec.resources
                        .clone()
                        .unwrap_or_else(default_registry_resources),
                ),
                security_context: Some(restricted_security_context(Some(REGISTRY_UID))),
                termination_message_policy: Some(TERMINATION_MESSAGE_POLICY.to_string()),
                env: v.s3.as_ref().map(|_| cluster_self_env(v)),
                volume_mounts: Some(mounts),
                ..Container::default()
            }],
            volumes: Some(volumes),
            termination_grace_period_seconds: Some(30),
            ..PodSpec::default()
        }),
    }
}

/// `POD_NAME` from the downward API, then [`CLUSTER_SELF_ENV`] built from it (a variable may
/// refer to one defined before it): each replica's own URL under the peers Service.
fn cluster_self_env(v: &Validated) -> Vec<EnvVar> {
    vec![
        EnvVar {
            name: "POD_NAME".to_string(),
            value_from: Some(EnvVarSource {
                field_ref: Some(ObjectFieldSelector {
                    field_path: "metadata.name".to_string(),
                    api_version: None,
                }),
                ..EnvVarSource::default()
            }),
            ..EnvVar::default()
        },
        EnvVar {
            name: CLUSTER_SELF_ENV.to_string(),
            value: Some(peer_url(v, "$(POD_NAME)")),
            ..EnvVar::default()
        },
    ]
}

/// Whether the live registry StatefulSet must be deleted before `desired` can be applied: the
/// fields the API server never lets change differ (switching between PVC and S3 storage changes
/// `serviceName` and the claim templates). A resize of the claims is not such a change here.
#[must_use]
pub fn stateful_set_needs_replacement(live: &StatefulSet, desired: &StatefulSet) -> bool {
    let claims = |s: &StatefulSet| -> Vec<Option<String>> {
        s.spec
            .volume_claim_templates
            .iter()
            .flatten()
            .map(|c| c.metadata.name.clone())
            .collect()
    };
    let service_name = |s: &StatefulSet| s.spec.service_name.clone().unwrap_or_default();
    let policy = |s: &StatefulSet| {
        s.spec
            .pod_management_policy
            .clone()
            .unwrap_or_else(|| "OrderedReady".to_string())
    };
    service_name(live) != service_name(desired)
        || claims(live) != claims(desired)
        || policy(live) != policy(desired)
}

/// The URL nodes use to reach the proxy, from the exposure and the applied Service (`https`
/// with `spec.tls`). `None` when the Service has no cluster IP or node port yet.
#[must_use]
pub fn node_endpoint(v: &Validated, applied_service: Option<&Service>) -> Option<String> {
    let scheme = if v.tls.is_some() { "https" } else { "http" };
    match &v.exposure {
        Exposure::External(url) => Some(url.clone()),
        Exposure::ClusterIp => {
            let ip = applied_service?.spec.as_ref()?.cluster_ip.as_ref()?;
            if ip.is_empty() || ip == "None" {
                return None;
            }
            // IPv6 cluster IPs need brackets in a URL.
            if ip.contains(':') {
                Some(format!("{scheme}://[{ip}]:{REGISTRY_PORT}"))
            } else {
                Some(format!("{scheme}://{ip}:{REGISTRY_PORT}"))
            }
        }
        Exposure::NodePort(fixed) => {
            let port = fixed.or_else(|| {
                applied_service?
                    .spec
                    .as_ref()?
                    .ports
                    .as_ref()?
                    .first()?
                    .node_port
            })?;
            // The agent runs with hostNetwork on every node, and kube-proxy serves node ports
            // on the node's own addresses, so loopback reaches the proxy from any node.
            Some(format!("{scheme}://127.0.0.1:{port}"))
        }
    }
}

/// The desired state for the node agents: `removing` on deletion; no registries while the
/// endpoint is unknown (so nodes keep pulling upstream rather than through a dead address).
///
/// # Errors
/// [`BuildError::Serialize`] if hashing the state fails.
pub fn desired_state(
    mirror: &RegistryMirror,
    v: &Validated,
    endpoint: Option<&str>,
    removing: bool,
) -> Result<DesiredState, BuildError> {
    let nodes = &mirror.spec.nodes;
    let registries = match (endpoint, removing) {
        (Some(endpoint), false) => v
            .registries
            .iter()
            .map(|r| DesiredRegistry {
                registry: r.name.clone(),
                server: None,
                endpoints: vec![endpoint.to_string()],
                fallback: match nodes.fallback {
                    FallbackPolicy::Upstream => protocol::Fallback::Upstream,
                    FallbackPolicy::Never => protocol::Fallback::Never,
                },
                dial_timeout: nodes.dial_timeout.clone(),
                skip_verify: false,
                ca_file: None,
                override_path: false,
                client_cert: None,
            })
            .collect(),
        _ => Vec::new(),
    };
    let mut desired = DesiredState {
        mirror: format!("{}/{}", v.namespace, v.name),
        generation: String::new(),
        removing,
        runtime: match nodes.runtime {
            NodeRuntime::Containerd => protocol::Runtime::Containerd,
            NodeRuntime::Crio => protocol::Runtime::Crio,
            NodeRuntime::Docker => protocol::Runtime::Docker,
        },
        registries,
        unreachable_after: nodes.unreachable_after.clone(),
        merge_with_admin_file: nodes.merge_with_admin_file,
        mirror_ca_file: v
            .tls
            .as_ref()
            .map(|_| format!("{AGENT_MIRROR_CA_DIR}/{MIRROR_CA_KEY}")),
        mirror_client_cert: v
            .tls
            .as_ref()
            .and_then(|t| t.node_client_cert_secret.as_ref())
            .map(|_| protocol::ClientCertFiles {
                cert_file: format!("{AGENT_NODE_CLIENT_DIR}/{TLS_CERT_KEY}"),
                key_file: format!("{AGENT_NODE_CLIENT_DIR}/{TLS_KEY_KEY}"),
            }),
    };
    let bytes = serde_json::to_vec(&desired).map_err(|e| BuildError::Serialize {
        what: "desired state",
        message: e.to_string(),
    })?;
    desired.generation = short_hash(&bytes);
    Ok(desired)
}

/// Builds the node side: the desired-state ConfigMap and the agent DaemonSet.
///
/// # Errors
/// [`BuildError::Serialize`] when the desired state cannot be serialised.
pub fn build_agent(
    mirror: &RegistryMirror,
    v: &Validated,
    cfg: &BuildConfig,
    endpoint: Option<&str>,
    removing: bool,
) -> Result<AgentObjects, BuildError> {
    let desired = desired_state(mirror, v, endpoint, removing)?;
    let json = serde_json::to_string_pretty(&desired).map_err(|e| BuildError::Serialize {
        what: "desired state",
        message: e.to_string(),
    })?;
    let config_map = ConfigMap {
        metadata: meta(v, agent_name(&v.name), "node-agent"),
        data: Some(BTreeMap::from([(DESIRED_KEY.to_string(), json)])),
        ..ConfigMap::default()
    };
    let nodes = &mirror.spec.nodes;
    let image = mirror
        .spec
        .image
        .clone()
        .unwrap_or_else(|| cfg.image.clone());
    let mut args = vec![
        "node-agent".to_string(),
        "--desired-file".to_string(),
        format!("{AGENT_DESIRED_DIR}/{DESIRED_KEY}"),
        "--certs-dir".to_string(),
        HOST_CERTS_DIR.to_string(),
        "--containerd-config".to_string(),
        format!(
            "{HOST_CONTAINERD_DIR}/{}",
            file_name(&nodes.containerd_config)
        ),
        "--listen".to_string(),
        format!("0.0.0.0:{AGENT_PORT}"),
        "--node-name".to_string(),
        "$(NODE_NAME)".to_string(),
        // The path as containerd sees it, so the agent can report a config_path mismatch.
        "--host-certs-dir".to_string(),
        nodes.certs_dir.clone(),
        // So that imports under the config's directory are read from the mount.
        "--host-containerd-config".to_string(),
        nodes.containerd_config.clone(),
    ];
    let mut volumes = vec![
        Volume {
            name: "desired".to_string(),
            config_map: Some(ConfigMapVolumeSource {
                name: agent_name(&v.name),
                ..ConfigMapVolumeSource::default()
            }),
            ..Volume::default()
        },
        host_path_volume("certs-d", &nodes.certs_dir, "DirectoryOrCreate"),
        // The directory, not the file: a missing config.toml must be reported by the agent
        // (ContainerdConfigUnreadable), not block the pod from starting.
        host_path_volume(
            "containerd-config",
            parent_dir(&nodes.containerd_config),
            "",
        ),
    ];
    let mut mounts = vec![
        mount("desired", AGENT_DESIRED_DIR, true),
        mount("certs-d", HOST_CERTS_DIR, false),
        mount("containerd-config", HOST_CONTAINERD_DIR, true),
    ];
    if nodes.runtime == NodeRuntime::Crio {
        volumes.push(host_path_volume(
            "registries-conf-d",
            &nodes.registries_conf_dir,
            "DirectoryOrCreate",
        ));
        mounts.push(mount("registries-conf-d", HOST_REGISTRIES_CONF_DIR, false));
        args.push("--registries-conf-dir".to_string());
        args.push(HOST_REGISTRIES_CONF_DIR.to_string());
    }
    if nodes.runtime == NodeRuntime::Docker {
        volumes.push(host_path_volume(
            "docker-config",
            parent_dir(&nodes.docker_config),
            "DirectoryOrCreate",
        ));
        mounts.push(mount("docker-config", HOST_DOCKER_CONFIG_DIR, false));
        args.extend([
            "--docker-config".to_string(),
            format!(
                "{HOST_DOCKER_CONFIG_DIR}/{}",
                file_name(&nodes.docker_config)
            ),
            "--host-docker-config".to_string(),
            nodes.docker_config.clone(),
        ]);
    }
    if let Some(tls) = &v.tls {
        // Only `ca.crt`, and optional: a publicly trusted certificate comes without one.
        let (volume, ca_mount) = secret_keys_volume(
            "mirror-ca",
            &tls.secret_name,
            &[MIRROR_CA_KEY],
            AGENT_MIRROR_CA_DIR,
            true,
        );
        volumes.push(volume);
        mounts.push(ca_mount);
        if let Some(secret) = &tls.node_client_cert_secret {
            // Not optional: the reference check holds everything back until it exists. 0400:
            // the agent runs as root and is the only reader.
            let (volume, client_mount) = secret_keys_volume_with_mode(
                "node-client",
                secret,
                &[TLS_CERT_KEY, TLS_KEY_KEY],
                AGENT_NODE_CLIENT_DIR,
                false,
                0o400,
            );
            volumes.push(volume);
            mounts.push(client_mount);
        }
    }
    let pid_file = runtime_pid_file(nodes);
    if let Some(pid_file) = &pid_file {
        // The file, not its directory (/var/run holds the runtime's sockets). A runtime that
        // replaces its pid file on restart leaves this mount on the old one: the agent then
        // reports RuntimeReloadFailed until its pod restarts.
        volumes.push(host_path_volume("runtime-pid", pid_file, "File"));
        mounts.push(mount("runtime-pid", HOST_RUNTIME_PID_FILE, true));
        let flag = match nodes.runtime {
            NodeRuntime::Docker => "--docker-pid-file",
            _ => "--crio-pid-file",
        };
        args.extend([flag.to_string(), HOST_RUNTIME_PID_FILE.to_string()]);
    }
    let daemon_set = DaemonSet {
        metadata: meta(v, agent_name(&v.name), "node-agent"),
        spec: DaemonSetSpec {
            selector: LabelSelector {
                match_labels: Some(selector_labels(&v.name, "node-agent")),
                ..LabelSelector::default()
            },
            update_strategy: Some(DaemonSetUpdateStrategy {
                type_: Some("RollingUpdate".to_string()),
                rolling_update: Some(RollingUpdateDaemonSet {
                    max_unavailable: Some(IntOrString::String("25%".to_string())),
                    ..RollingUpdateDaemonSet::default()
                }),
            }),
            revision_history_limit: Some(3),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(object_labels(&v.name, "node-agent")),
                    ..ObjectMeta::default()
                }),
                spec: Some(PodSpec {
                    // The agent never talks to the API server: it reports over HTTP.
                    automount_service_account_token: Some(false),
                    enable_service_links: Some(false),
                    host_network: Some(true),
                    // Only to signal the runtime by its host pid (see `runtime_pid_file`).
                    host_pid: pid_file.is_some().then_some(true),
                    dns_policy: Some("ClusterFirstWithHostNet".to_string()),
                    node_selector: (!nodes.node_selector.is_empty())
                        .then(|| nodes.node_selector.clone()),
                    tolerations: (!nodes.tolerations.is_empty()).then(|| nodes.tolerations.clone()),
                    containers: vec![Container {
                        name: "node-agent".to_string(),
                        image: Some(image),
                        command: Some(vec!["/usr/local/bin/cachalot-operator".to_string()]),
                        args: Some(args),
                        env: Some(vec![EnvVar {
                            name: "NODE_NAME".to_string(),
                            value_from: Some(EnvVarSource {
                                field_ref: Some(ObjectFieldSelector {
                                    field_path: "spec.nodeName".to_string(),
                                    api_version: None,
                                }),
                                ..EnvVarSource::default()
                            }),
                            ..EnvVar::default()
                        }]),
                        ports: Some(vec![ContainerPort {
                            name: Some("status".to_string()),
                            container_port: AGENT_PORT,
                            protocol: Some("TCP".to_string()),
                            ..ContainerPort::default()
                        }]),
                        readiness_probe: Some(http_probe("/readyz", "status", 10, 3)),
                        liveness_probe: Some(http_probe("/healthz", "status", 20, 3)),
                        resources: Some(ResourceRequirements {
                            requests: Some(BTreeMap::from([
                                ("cpu".to_string(), Quantity("10m".to_string())),
                                ("memory".to_string(), Quantity("16Mi".to_string())),
                            ])),
                            limits: Some(BTreeMap::from([(
                                "memory".to_string(),
                                Quantity("64Mi".to_string()),
                            )])),
                            ..ResourceRequirements::default()
                        }),
                        // Root only to write root-owned host directories; no capabilities.
                        security_context: Some(restricted_security_context(Some(0))),
                        termination_message_policy: Some(TERMINATION_MESSAGE_POLICY.to_string()),
                        volume_mounts: Some(mounts),
                        ..Container::default()
                    }],
                    volumes: Some(volumes),
                    termination_grace_period_seconds: Some(10),
                    ..PodSpec::default()
                }),
            },
            ..DaemonSetSpec::default()
        },
        ..DaemonSet::default()
    };
    Ok(AgentObjects {
        desired,
        config_map,
        daemon_set,
    })
}

fn host_path_volume(name: &str, path: &str, type_: &str) -> Volume {
    Volume {
        name: name.to_string(),
        host_path: Some(HostPathVolumeSource {
            path: path.to_string(),
            type_: Some(type_.to_string()),
        }),
        ..Volume::default()
    }
}

fn mount(name: &str, path: &str, read_only: bool) -> VolumeMount {
    VolumeMount {
        name: name.to_string(),
        mount_path: path.to_string(),
        read_only: Some(read_only),
        ..VolumeMount::default()
    }
}

fn parent_dir(path: &str) -> &str {
    match path.rsplit_once('/') {
        Some(("", _)) | None => "/",
        Some((dir, _)) => dir,
    }
}

fn file_name(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}
