//! The `RegistryMirror` spec: which registries to mirror, how the proxy runs, how nodes use it.
//!
//! Invariants: every field is documented (it becomes the CRD description); defaults live in
//! `#[serde(default = ...)]` functions so the schema, the API server's defaulting and the
//! operator agree; patterns and CEL rules reject what would otherwise only fail on a node.

// Each `printcolumn(...)` repeats `type_ = "string"`, which clippy mistakes for a duplicate.
#![allow(clippy::duplicated_attributes)]

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{ResourceRequirements, Toleration};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::RegistryMirrorStatus;

/// Host name with optional port, as image references name a registry (`docker.io`, `ghcr.io`,
/// `registry.local:5000`). Lower case, like containerd's certs.d directory names.
pub const REGISTRY_NAME_PATTERN: &str =
    r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*(:[0-9]{1,5})?$";
/// A spoke id: what `X-Cachalot-Spoke` may carry (the registry checks the same).
pub const SPOKE_ID_PATTERN: &str = r"^[A-Za-z0-9._/:@-]{1,128}$";
/// An http(s) URL with a host and an optional path, no query or fragment.
pub const URL_PATTERN: &str = r"^https?://[^\s/?#]+(/[^\s?#]*)?$";
/// A Go-style duration (`500ms`, `3s`, `1m30s`, `6h`), the syntax containerd and the registry use.
pub const DURATION_PATTERN: &str = r"^([0-9]+(ms|s|m|h))+$";
/// An absolute path on the node in plain characters (`..` segments are refused by the operator).
pub const NODE_PATH_PATTERN: &str = r"^/[A-Za-z0-9._/-]*$";
/// A pin: a repository glob with an optional tag glob after `:` (`library/nginx:stable`,
/// `library/redis:*`, `myteam/*`). The registry's parser checks the rest (no `//`, no leading or
/// trailing `/`).
pub const PIN_PATTERN: &str = r"^[a-z0-9._/*?-]+(:[A-Za-z0-9._*?-]{1,128})?$";
/// A Kubernetes object name that is a DNS subdomain (Secrets, ConfigMaps).
pub const OBJECT_NAME_PATTERN: &str = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$";
/// A ConfigMap key (`kubectl create configmap --from-file` names); `.`, `..` and a leading `..`
/// are refused by a CEL rule, as the API server refuses them.
pub const CONFIG_MAP_KEY_PATTERN: &str = r"^[-._a-zA-Z0-9]+$";
/// An S3 bucket name (3-63 of lower-case letters, digits, `-` and `.`, starting and ending with
/// a letter or digit), as the registry checks it.
pub const BUCKET_PATTERN: &str = r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$";
/// An S3 signing region (`us-east-1`, `eu-central-1`, `garage`, `RegionOne`).
pub const REGION_PATTERN: &str = r"^[A-Za-z0-9][-_.A-Za-z0-9]*$";
/// A key prefix in a bucket: relative path components of letters, digits, `-`, `_` and `.`
/// (a component never starts with `.`, so `.` and `..` are refused), an optional trailing `/`.
pub const S3_PREFIX_PATTERN: &str =
    r"^[A-Za-z0-9_-][A-Za-z0-9_.-]*(/[A-Za-z0-9_-][A-Za-z0-9_.-]*)*/?$";

/// Desired state of a cachalot pull-through mirror: a caching registry for one or more upstream
/// registries, and the containerd configuration that makes the selected nodes pull through it
/// while image references stay unchanged.
#[derive(CustomResource, Serialize, Deserialize, Debug, Clone, PartialEq, JsonSchema)]
#[kube(
    group = "cachalot.dev",
    version = "v1alpha1",
    kind = "RegistryMirror",
    namespaced,
    shortname = "rmirror",
    category = "cachalot",
    status = "RegistryMirrorStatus",
    derive = "PartialEq",
    doc = "A pull-through caching mirror for container registries, and the node configuration that uses it.",
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status",
        description = "Whether the mirror serves pulls on its nodes"
    ),
    printcolumn(
        name = "Endpoint",
        type_ = "string",
        json_path = ".status.endpoint",
        description = "The URL nodes pull through"
    ),
    printcolumn(
        name = "Nodes",
        type_ = "string",
        json_path = ".status.nodes.summary",
        description = "Nodes configured / nodes selected"
    ),
    printcolumn(
        name = "Hit-Ratio",
        type_ = "string",
        json_path = ".status.cache.hitRatio",
        description = "Share of requests served from the cache"
    ),
    printcolumn(
        name = "Budget",
        type_ = "string",
        json_path = ".status.budgetSummary",
        description = "Lowest upstream rate-limit budget remaining/limit"
    ),
    printcolumn(
        name = "Warm",
        type_ = "string",
        json_path = ".status.warm.summary",
        description = "spec.warm: state and images warmed / listed"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "self.registries.all(r, self.registries.exists_one(s, s.name == r.name))",
        "message": "each registry may appear only once in spec.registries"
    },
    {
        "rule": "!has(self.defaultRegistry) || self.registries.exists(r, r.name == self.defaultRegistry)",
        "message": "spec.defaultRegistry must name one of spec.registries"
    },
    {
        "rule": "self.service.type != 'External' || !has(self.parent)",
        "message": "spec.parent configures the in-cluster proxy; it cannot be combined with service.type External"
    }
]))]
pub struct RegistryMirrorSpec {
    /// The upstream registries this mirror serves, e.g. `docker.io`. Each gets a `hosts.toml` on
    /// every selected node. At least one, at most 16.
    #[schemars(length(min = 1, max = 16))]
    pub registries: Vec<MirroredRegistry>,

    /// The registry that requests without an `ns` parameter go to (clients that do not say which
    /// registry they mean, such as dockerd's `--registry-mirror`). Defaults to the first entry of
    /// `registries`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = REGISTRY_NAME_PATTERN))]
    pub default_registry: Option<String>,

    /// Chain to another cachalot mirror (a hub, possibly in another cluster) instead of going to
    /// the upstream registries directly; the registry namespace of each request is passed through,
    /// so many clusters behind one NAT spend one upstream budget.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<ParentMirror>,

    /// Serve the pull API over TLS, optionally with client authentication (a hub reached from
    /// other clusters). The endpoint in status and on the nodes becomes `https://`; the admin
    /// port (probes, `/stats`, `/metrics`) stays plain HTTP inside the cluster, and the replicas of
    /// an `S3` mirror forward to each other there. Not with `service.type: External` (nothing
    /// is deployed here) or node runtimes other than `Containerd`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<MirrorTls>,

    /// Where the cache lives and how big it may grow.
    #[serde(default)]
    pub storage: Storage,

    /// Number of registry pods. With more than one, a PodDisruptionBudget keeps one available.
    /// With `EmptyDir` or `PersistentVolumeClaim` storage each pod has its own cache and fetches
    /// from the upstream on its own (condition `CacheShared=False`); `S3` storage shares one.
    #[serde(default = "default_replicas")]
    #[schemars(range(min = 1, max = 10))]
    pub replicas: i32,

    /// Compute resources of the registry container. Defaults: requests 50m CPU / 64Mi memory,
    /// limit 512Mi memory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,

    /// Container image of the registry and the node agent (both binaries are in one image).
    /// Defaults to the image the operator was started with (`--image`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 512))]
    pub image: Option<String>,

    /// How nodes reach the proxy.
    #[serde(default)]
    pub service: ServiceExposure,

    /// Which nodes use the mirror and how their container runtime is configured.
    #[serde(default)]
    pub nodes: NodeSettings,

    /// Pin the images running Pods use: every reconcile pass (about once a minute) lists the
    /// Pods and writes the images of this mirror's registries (tags, and digests from container
    /// statuses; at most 2000 entries) into the registry's pin file, which it re-reads at each
    /// eviction pass and never evicts. Adds to `registries[].pin`. Off by default.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub pin_workload_images: bool,

    /// Images to pre-fetch into the cache (`nginx:stable`, `docker.io/library/alpine:3.19`,
    /// `ghcr.io/org/app@sha256:…`), every platform of each. One ready registry pod is asked to
    /// warm the list when the mirror first serves and again whenever the list changes (the
    /// list's hash is recorded in `status.warm`, so an unchanged list is never warmed twice);
    /// failed items are retried with a growing delay. Warming never spends the upstream
    /// budget reserve. Each registry must be one of `registries`. At most 100.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 100), inner(length(min = 1, max = 512)))]
    pub warm: Vec<String>,
}

fn default_replicas() -> i32 {
    1
}

/// One upstream registry served through the mirror.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "self.name != 'docker.io' || !has(self.url) || self.url.startsWith('https://')",
        "message": "docker.io must be reached over https"
    }
]))]
pub struct MirroredRegistry {
    /// The registry host as image references name it: `docker.io`, `ghcr.io`, `quay.io`,
    /// `registry.example.com:5000`. Pulls of `nginx:stable` are pulls from `docker.io`.
    #[schemars(length(min = 1, max = 253), regex(pattern = REGISTRY_NAME_PATTERN))]
    pub name: String,

    /// The upstream URL the proxy fetches from. Defaults to `https://registry-1.docker.io` for
    /// `docker.io` and `https://<name>` otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 2048), regex(pattern = URL_PATTERN))]
    pub url: Option<String>,

    /// A Secret in the mirror's namespace with upstream credentials. It is mounted as files into
    /// the registry pods; credentials are never copied into the registry's ConfigMap. While it
    /// does not exist, the mirror is not Ready (reason `CredentialsSecretMissing`) and nothing is
    /// applied; its keys are checked by the registry, not the operator.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_secret: Option<CredentialsSecretRef>,

    /// A ConfigMap in the mirror's namespace whose key holds PEM CA certificates the registry
    /// trusts for this upstream's https URL, in addition to the default roots (an internal
    /// registry with a private CA). Only that key is mounted read-only into the registry pods,
    /// under `/etc/cachalot/ca/<name>/` (`:` of a port becomes `_`). While the ConfigMap does
    /// not exist, the mirror is not Ready (reason `CaConfigMapMissing`) and nothing is applied.
    /// The registry reads the certificates when it starts: after changing the ConfigMap's
    /// content, restart the registry pods (`kubectl rollout restart`). Unused while
    /// `spec.parent` is set (the hub reaches the upstream; see `parent.caConfigMap`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_config_map: Option<CaConfigMapRef>,

    /// How long a tag may be served from the cache before it is revalidated upstream (with a HEAD,
    /// which does not count against Docker Hub's pull limit). First matching rule wins; tags that
    /// match no rule use the registry's default. Digest references never go upstream once cached.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub freshness: Vec<FreshnessRule>,

    /// When the upstream's remaining rate-limit budget falls to this many requests, the proxy
    /// serves cached (stale) tags instead of spending a counted GET. Default: the registry's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 100000))]
    pub budget_reserve: Option<i64>,

    /// Images whose cached content is never evicted, as `REPOSITORY[:TAG]` patterns with the
    /// globs `*` and `?` (`library/nginx:stable`, `library/redis:*`, `myteam/*`; no tag means
    /// every tag). On docker.io a one-component repository means `library/<name>`, as in pulls.
    /// A pinned tag keeps its manifest, the cached platform manifests of an index, and their
    /// config and layers, even if that exceeds `storage.maxSize`. The images of running Pods are
    /// pinned in addition when `pinWorkloadImages` is set.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), inner(length(min = 1, max = 384), regex(pattern = PIN_PATTERN)))]
    pub pin: Vec<String>,
}

/// Reference to a Secret holding credentials for one upstream registry.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CredentialsSecretRef {
    /// Name of the Secret, in the RegistryMirror's namespace.
    #[schemars(length(min = 1, max = 253), regex(pattern = OBJECT_NAME_PATTERN))]
    pub name: String,

    /// The Secret's layout: `Basic` reads the keys `username` and `password`
    /// (`kubernetes.io/basic-auth`); `DockerConfigJson` reads `.dockerconfigjson`
    /// (`kubernetes.io/dockerconfigjson`).
    #[serde(default, rename = "type")]
    pub kind: CredentialsKind,
}

/// Layout of a credentials Secret.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, Default, PartialEq, Eq, JsonSchema)]
pub enum CredentialsKind {
    /// Keys `username` and `password`.
    #[default]
    Basic,
    /// Key `.dockerconfigjson`.
    DockerConfigJson,
}

/// Reference to a key of a ConfigMap holding PEM CA certificates (one or more `-----BEGIN
/// CERTIFICATE-----` blocks).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "!has(self.key) || (self.key != '.' && !self.key.startsWith('..'))",
        "message": "caConfigMap.key must not be '.' or start with '..'"
    }
]))]
pub struct CaConfigMapRef {
    /// Name of the ConfigMap, in the RegistryMirror's namespace.
    #[schemars(length(min = 1, max = 253), regex(pattern = OBJECT_NAME_PATTERN))]
    pub name: String,

    /// The key whose value is the PEM bundle; it becomes the file name in the registry pods.
    /// Other keys of the ConfigMap are not mounted.
    #[serde(default = "default_ca_key")]
    #[schemars(length(min = 1, max = 253), regex(pattern = CONFIG_MAP_KEY_PATTERN))]
    pub key: String,
}

/// The key `kubectl create configmap NAME --from-file=ca.crt` writes.
fn default_ca_key() -> String {
    "ca.crt".to_string()
}

/// A freshness rule for tags matching a glob pattern.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "self.immutable ? !has(self.maxAge) : has(self.maxAge)",
        "message": "set either maxAge or immutable: true"
    }
]))]
pub struct FreshnessRule {
    /// Glob over the tag, e.g. `latest`, `v*`, `*-alpine`.
    #[schemars(length(min = 1, max = 128))]
    pub pattern: String,

    /// Revalidate a cached tag once it is older than this (Go duration: `1m`, `1h30m`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = DURATION_PATTERN))]
    pub max_age: Option<String>,

    /// Tags matching this pattern never change once cached (for example release tags), so they are
    /// never revalidated.
    #[serde(default)]
    pub immutable: bool,
}

/// Another cachalot mirror to chain to.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ParentMirror {
    /// Base URL of the parent mirror's registry API, e.g. `http://hub.example.internal:5000`.
    #[schemars(length(max = 2048), regex(pattern = URL_PATTERN))]
    pub url: String,

    /// A ConfigMap in the mirror's namespace whose key holds PEM CA certificates the registry
    /// trusts for an https `url`, in addition to the default roots (a hub serving TLS with an
    /// internal CA). Only that key is mounted read-only into the registry pods, under
    /// `/etc/cachalot/parent-ca/`. While the ConfigMap does not exist, the mirror is not Ready
    /// (reason `CaConfigMapMissing`) and nothing is applied. The registry reads the certificates
    /// when it starts: after changing the ConfigMap's content, restart the registry pods
    /// (`kubectl rollout restart`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_config_map: Option<CaConfigMapRef>,

    /// How this spoke names itself to the hub (`X-Cachalot-Spoke`): the hub's `/stats` lists
    /// each spoke by it. Give every spoke in the fleet its own, e.g. `<cluster>/<namespace>/<name>`;
    /// defaults to `<namespace>/<name>`, which is the same in every cluster that applies the same
    /// manifest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 128), regex(pattern = SPOKE_ID_PATTERN))]
    pub spoke_id: Option<String>,

    /// A client certificate for a parent that requires mTLS (its `spec.tls.clientAuth.caSecretKey`).
    /// Needs an https `url`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<ParentTls>,

    /// A bearer token for a parent that requires one (its `spec.tls.clientAuth.bearerTokenSecret`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<ParentAuth>,
}

/// TLS of the mirror's pull API.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MirrorTls {
    /// A `kubernetes.io/tls` Secret in the mirror's namespace: `tls.crt` (the chain, the
    /// server's certificate first) and `tls.key` are mounted read-only into the registry pods,
    /// which re-read them every second, so a renewed certificate (cert-manager) is served
    /// without a restart. The certificate must name the address nodes use (`status.endpoint`:
    /// the Service's cluster IP, or `127.0.0.1` for `NodePort`) and the names other clusters
    /// use. An optional `ca.crt` is mounted into the node agents, which install it beside each
    /// `hosts.toml` (`cachalot-ca.crt`) as the `ca` containerd trusts for the mirror; without it
    /// the nodes' system roots must trust the certificate. While the Secret does not exist, the
    /// mirror is not Ready (reason `TlsSecretMissing`) and nothing is applied.
    #[schemars(length(min = 1, max = 253), regex(pattern = OBJECT_NAME_PATTERN))]
    pub secret_name: String,

    /// Require clients of the pull API to authenticate (spokes in other clusters). This
    /// cluster's own nodes pull through the mirror only with
    /// `clientAuth.nodeClientCertSecret` (mTLS); without it their pulls go to the upstream
    /// (see docs/hub-and-spoke.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_auth: Option<ClientAuth>,
}

/// How clients of the pull API authenticate: a client certificate, a bearer token, or both.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "has(self.caSecretKey) || has(self.bearerTokenSecret)",
        "message": "clientAuth needs caSecretKey, bearerTokenSecret or both"
    },
    {
        "rule": "!has(self.nodeClientCertSecret) || (has(self.caSecretKey) && !has(self.bearerTokenSecret))",
        "message": "clientAuth.nodeClientCertSecret needs caSecretKey and no bearerTokenSecret: nodes authenticate by certificate only"
    }
]))]
pub struct ClientAuth {
    /// A key of the `tls.secretName` Secret holding the PEM CA that signs client certificates,
    /// usually `ca.crt` (cert-manager puts the issuing CA there): the TLS handshake then
    /// requires a client certificate signed by it (mTLS). Read when the registry starts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253), regex(pattern = CONFIG_MAP_KEY_PATTERN))]
    pub ca_secret_key: Option<String>,

    /// A Secret key holding the token clients send as `Authorization: Bearer <token>`; a
    /// request without it gets 401. Re-read when it changes (a rotated Secret needs no
    /// restart). While the Secret does not exist, the mirror is not Ready (reason
    /// `CredentialsSecretMissing`) and nothing is applied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bearer_token_secret: Option<SecretKeyRef>,

    /// A `kubernetes.io/tls` Secret in the mirror's namespace whose `tls.crt` (signed by the
    /// `caSecretKey` CA) and `tls.key` this cluster's nodes present to the mirror, so that
    /// their pulls go through it. Mounted read-only into the node agents (not the registry),
    /// which install both beside each `hosts.toml` (`cachalot-client.crt`, and
    /// `cachalot-client.key` readable by root only) as containerd's `client`, present them in
    /// their reachability probe, and replace them when the Secret changes. Needs `caSecretKey`
    /// and no `bearerTokenSecret` (nodes are given no token: it would sit in the world-readable
    /// `hosts.toml`). While the Secret does not exist, the mirror is not Ready (reason
    /// `TlsSecretMissing`) and nothing is applied. Every node holds this key: give it a
    /// certificate of its own, not a spoke's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_client_cert_secret: Option<SecretRef>,
}

/// Reference to one key of a Secret, in the RegistryMirror's namespace.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    /// Name of the Secret, in the RegistryMirror's namespace.
    #[schemars(length(min = 1, max = 253), regex(pattern = OBJECT_NAME_PATTERN))]
    pub name: String,

    /// The key whose value is used; only that key is mounted.
    #[schemars(length(min = 1, max = 253), regex(pattern = CONFIG_MAP_KEY_PATTERN))]
    pub key: String,
}

/// The client certificate a spoke presents to its parent.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ParentTls {
    /// A `kubernetes.io/tls` Secret in the mirror's namespace whose `tls.crt` and `tls.key`
    /// the registry presents to an https parent that asks for a client certificate (mTLS).
    /// Read when the registry starts: after renewing it, restart the registry pods. While the
    /// Secret does not exist, the mirror is not Ready (reason `TlsSecretMissing`) and nothing
    /// is applied.
    pub client_cert_secret: SecretRef,
}

/// The token a spoke sends to its parent.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ParentAuth {
    /// A Secret key holding the token sent to the parent as `Authorization: Bearer <token>`,
    /// re-read when it changes. While the Secret does not exist, the mirror is not Ready
    /// (reason `CredentialsSecretMissing`) and nothing is applied.
    pub bearer_token_secret: SecretKeyRef,
}

/// Cache storage.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "self.type != 'PersistentVolumeClaim' || has(self.size)",
        "message": "storage.size is required for PersistentVolumeClaim storage"
    },
    {
        "rule": "self.type == 'PersistentVolumeClaim' || !has(self.storageClassName)",
        "message": "storage.storageClassName only applies to PersistentVolumeClaim storage"
    },
    {
        "rule": "self.type == 'S3' ? has(self.s3) : !has(self.s3)",
        "message": "storage.s3 is required with type S3 and only allowed with it"
    },
    {
        "rule": "self.type != 'S3' || !has(self.size)",
        "message": "storage.size does not apply to S3 storage; storage.s3.localCacheSize sizes the local read cache"
    }
]))]
pub struct Storage {
    /// `EmptyDir` (default; the cache is lost when a pod goes), `PersistentVolumeClaim` (a
    /// StatefulSet with one claim per pod) or `S3` (one cache in an S3-compatible bucket shared
    /// by every replica, a StatefulSet with a local read cache per pod; see `s3`).
    #[serde(default, rename = "type")]
    pub kind: StorageKind,

    /// Size of each PersistentVolumeClaim, or the emptyDir size limit. Not with `S3`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<Quantity>,

    /// StorageClass of the claims; the cluster default when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub storage_class_name: Option<String>,

    /// Cache size bound: least recently used content is evicted above it. Defaults to 90% of
    /// `size` when that is set, otherwise 10Gi. With `S3` it bounds the mirror's objects under
    /// the bucket prefix (default 100Gi).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_size: Option<Quantity>,

    /// The bucket of `S3` storage; required with that type and only allowed with it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub s3: Option<S3Storage>,
}

/// Kind of cache storage.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, Default, PartialEq, Eq, JsonSchema)]
pub enum StorageKind {
    /// A pod-local emptyDir volume (Deployment).
    #[default]
    EmptyDir,
    /// A PersistentVolumeClaim per pod (StatefulSet).
    PersistentVolumeClaim,
    /// An S3-compatible bucket shared by the replicas (StatefulSet, emptyDir read cache per pod).
    S3,
}

/// An S3-compatible bucket (AWS S3, MinIO, Garage, Ceph RGW, ...) holding the cache of every
/// replica of the mirror.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct S3Storage {
    /// Base URL of the S3 API for a self-hosted store, e.g. `http://garage.storage.svc:3900`
    /// (path-style requests). AWS S3 when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 2048), regex(pattern = URL_PATTERN))]
    pub endpoint: Option<String>,

    /// Name of the bucket; it must exist (the registry does not create it).
    #[schemars(length(min = 3, max = 63), regex(pattern = BUCKET_PATTERN))]
    pub bucket: String,

    /// Signing region, e.g. `eu-central-1`, or what a self-hosted store expects (Garage:
    /// `garage`). The registry uses `us-east-1` when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 64), regex(pattern = REGION_PATTERN))]
    pub region: Option<String>,

    /// Key prefix of this mirror's objects in the bucket. Defaults to `<namespace>/<name>/` of
    /// the RegistryMirror, so mirrors sharing a bucket never share objects; a prefix claimed by
    /// another mirror makes the registry refuse to start. A trailing `/` is added when missing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 512), regex(pattern = S3_PREFIX_PATTERN))]
    pub prefix: Option<String>,

    /// A Secret in the mirror's namespace with the keys `access-key-id` and `secret-access-key`,
    /// mounted as files into the registry pods (never copied into a ConfigMap). Unset: the
    /// registry uses the standard AWS credential chain of its pods (environment, web identity,
    /// instance metadata).
    /// While the Secret does not exist, the mirror is not Ready (reason
    /// `CredentialsSecretMissing`) and nothing is applied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_secret_ref: Option<SecretRef>,

    /// Size limit of each registry pod's emptyDir in front of the bucket: a read cache of recently
    /// served content, bounded at half of it, and the staging area of fetches in flight.
    /// Default 10Gi; at least 64Mi.
    #[serde(
        default = "default_local_cache_size",
        skip_serializing_if = "Option::is_none"
    )]
    pub local_cache_size: Option<Quantity>,
}

/// The emptyDir limit of an S3 mirror's local read cache when `localCacheSize` is unset.
pub const DEFAULT_LOCAL_CACHE_SIZE: &str = "10Gi";

// An `Option` so that an explicit `null` (the schema is nullable) also means the default.
fn default_local_cache_size() -> Option<Quantity> {
    Some(Quantity(DEFAULT_LOCAL_CACHE_SIZE.to_string()))
}

/// Reference to a Secret by name, in the RegistryMirror's namespace.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretRef {
    /// Name of the Secret, in the RegistryMirror's namespace.
    #[schemars(length(min = 1, max = 253), regex(pattern = OBJECT_NAME_PATTERN))]
    pub name: String,
}

/// How the proxy is exposed to the nodes.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "self.type == 'External' ? has(self.externalUrl) : !has(self.externalUrl)",
        "message": "service.externalUrl is required with type External and only allowed with it"
    },
    {
        "rule": "!has(self.nodePort) || self.type == 'NodePort'",
        "message": "service.nodePort only applies to type NodePort"
    }
]))]
pub struct ServiceExposure {
    /// `ClusterIP` (default: nodes use the Service's cluster IP, which kube-proxy routes even
    /// though cluster DNS does not resolve on nodes), `NodePort` (nodes use
    /// `http://127.0.0.1:<nodePort>`), or `External` (no proxy is deployed here; nodes use
    /// `externalUrl`, for example a hub mirror outside the cluster).
    #[serde(default, rename = "type")]
    pub kind: ServiceKind,

    /// Fixed node port for type `NodePort`; allocated by the cluster when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 30000, max = 32767))]
    pub node_port: Option<i32>,

    /// The mirror URL nodes use with type `External`, e.g. `http://10.0.0.5:5000`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 2048), regex(pattern = URL_PATTERN))]
    pub external_url: Option<String>,
}

/// Service exposure type.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, Default, PartialEq, Eq, JsonSchema)]
pub enum ServiceKind {
    /// A ClusterIP Service.
    #[default]
    ClusterIP,
    /// A NodePort Service.
    NodePort,
    /// No in-cluster proxy; an external URL.
    External,
}

/// Node selection and container runtime configuration.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeSettings {
    /// Only nodes with these labels are configured (all nodes when empty). Two mirrors for the
    /// same registry must select disjoint nodes.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,

    /// Tolerations of the node agent pods, to reach tainted nodes (for example control planes).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,

    /// containerd's `config_path` on the node: the agent writes `<certsDir>/<registry>/hosts.toml`.
    #[serde(default = "default_certs_dir")]
    #[schemars(length(max = 1024), regex(pattern = NODE_PATH_PATTERN))]
    pub certs_dir: String,

    /// containerd's config.toml on the node, read (never written) to report configuration problems
    /// such as `config_path` not set.
    #[serde(default = "default_containerd_config")]
    #[schemars(length(max = 1024), regex(pattern = NODE_PATH_PATTERN))]
    pub containerd_config: String,

    /// For runtime `Crio`: the `registries.conf.d` directory the agent writes its drop-in to.
    #[serde(default = "default_registries_conf_dir")]
    #[schemars(length(max = 1024), regex(pattern = NODE_PATH_PATTERN))]
    pub registries_conf_dir: String,

    /// For runtime `Docker`: dockerd's `daemon.json` on the node. The agent merges the mirror as
    /// the first of its `registry-mirrors`, keeping every other key, and takes it out again.
    #[serde(default = "default_docker_config")]
    #[schemars(length(max = 1024), regex(pattern = NODE_PATH_PATTERN))]
    pub docker_config: String,

    /// The runtime's pid file on the node, for the agent to send it SIGHUP after changing its
    /// configuration (CRI-O re-reads registries.conf, dockerd re-reads daemon.json). When set,
    /// the agent pods run with `hostPID` and the file mounted read-only. Default for `Docker`:
    /// `/var/run/docker.pid` (dockerd reads a changed daemon.json only on reload); none for
    /// `Crio` (CRI-O under systemd writes no pid file; reload it yourself or give one); unused
    /// for `Containerd`, which reads hosts.toml on every pull.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024), regex(pattern = NODE_PATH_PATTERN))]
    pub runtime_pid_file: Option<String>,

    /// What nodes do when the mirror cannot serve a pull: `Upstream` (default; go to the registry
    /// directly) or `Never` (fail the pull rather than spend upstream budget from the node).
    #[serde(default)]
    pub fallback: FallbackPolicy,

    /// containerd `dial_timeout` for the mirror endpoint: short, so a dead mirror costs little.
    #[serde(default = "default_dial_timeout")]
    #[schemars(regex(pattern = DURATION_PATTERN))]
    pub dial_timeout: String,

    /// How long the mirror may stay unreachable from a node before the agent takes it out of that
    /// node's configuration.
    #[serde(default = "default_unreachable_after")]
    #[schemars(regex(pattern = DURATION_PATTERN))]
    pub unreachable_after: String,

    /// Container runtime of the nodes.
    #[serde(default)]
    pub runtime: NodeRuntime,

    /// When a node already has an administrator's own `hosts.toml` for a registry, merge the
    /// mirror ahead of its hosts (keeping a copy to restore) instead of leaving that node
    /// unconfigured.
    #[serde(default)]
    pub merge_with_admin_file: bool,
}

impl Default for NodeSettings {
    fn default() -> Self {
        Self {
            node_selector: BTreeMap::new(),
            tolerations: Vec::new(),
            certs_dir: default_certs_dir(),
            containerd_config: default_containerd_config(),
            registries_conf_dir: default_registries_conf_dir(),
            docker_config: default_docker_config(),
            runtime_pid_file: None,
            fallback: FallbackPolicy::default(),
            dial_timeout: default_dial_timeout(),
            unreachable_after: default_unreachable_after(),
            runtime: NodeRuntime::default(),
            merge_with_admin_file: false,
        }
    }
}

fn default_certs_dir() -> String {
    "/etc/containerd/certs.d".to_string()
}
fn default_containerd_config() -> String {
    "/etc/containerd/config.toml".to_string()
}
fn default_registries_conf_dir() -> String {
    "/etc/containers/registries.conf.d".to_string()
}
fn default_docker_config() -> String {
    "/etc/docker/daemon.json".to_string()
}
fn default_dial_timeout() -> String {
    "3s".to_string()
}
fn default_unreachable_after() -> String {
    "30s".to_string()
}

/// Node behaviour when the mirror fails.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, Default, PartialEq, Eq, JsonSchema)]
pub enum FallbackPolicy {
    /// Fall back to the upstream registry.
    #[default]
    Upstream,
    /// Never contact the upstream from the node.
    Never,
}

/// Container runtime family of the nodes.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, Default, PartialEq, Eq, JsonSchema)]
pub enum NodeRuntime {
    /// containerd (`certs.d/<registry>/hosts.toml`).
    #[default]
    Containerd,
    /// CRI-O (a `registries.conf.d` drop-in).
    Crio,
    /// Docker Engine (`registry-mirrors` in `daemon.json`): Docker mirrors Docker Hub only, so
    /// the mirror must serve `docker.io` alone.
    Docker,
}
