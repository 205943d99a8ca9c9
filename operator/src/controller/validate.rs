//! Validation stage: checks a `RegistryMirror` spec beyond what the CRD schema enforces and
//! derives the normalised values the build stage needs.
//!
//! Invariants: pure (no client, no clock); every error names the offending field; anything that
//! passes here builds objects the API server accepts and a registry config the registry accepts
//! (the rendered config is run through `cachalot_registry::config::Config::validate`). The schema
//! is not trusted alone because an older CRD, `kubectl --validate=false` or a fake API server may
//! let invalid objects through.

use std::time::Duration;

use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

use crate::api::{
    FreshnessRule, MirrorTls, NodeRuntime, NodeSettings, ParentMirror, RegistryMirror,
    RegistryMirrorSpec, S3Storage, SecretKeyRef, ServiceKind, StorageKind,
    DEFAULT_LOCAL_CACHE_SIZE,
};

/// Longest mirror name: derived object names (`cachalot-<name>-agent`, StatefulSet pod names with
/// their revision hash label) must stay within 63 characters.
pub const MAX_MIRROR_NAME_LEN: usize = 40;
/// Default cache bound when neither `storage.maxSize` nor `storage.size` is given.
pub const DEFAULT_MAX_SIZE_BYTES: u64 = 10 * 1024 * 1024 * 1024;
/// Default bound of an S3 mirror's objects under its bucket prefix (`storage.maxSize` unset).
pub const DEFAULT_S3_MAX_SIZE_BYTES: u64 = 100 * 1024 * 1024 * 1024;

/// Why a spec was refused. Every variant is permanent: the object has to change.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValidateError {
    /// A field holds a value the operator cannot use.
    #[error("{field}: {message}")]
    InvalidField {
        /// JSON path of the field, e.g. `spec.registries[0].url`.
        field: String,
        /// What is wrong.
        message: String,
    },
    /// The object lacks metadata the API server always sets.
    #[error("metadata.{0} is missing")]
    MissingMetadata(&'static str),
}

impl ValidateError {
    /// The static category used in metrics labels and Event reasons.
    #[must_use]
    pub fn category(&self) -> &'static str {
        "InvalidSpec"
    }
}

fn invalid(field: impl Into<String>, message: impl Into<String>) -> ValidateError {
    ValidateError::InvalidField {
        field: field.into(),
        message: message.into(),
    }
}

/// How nodes reach the proxy, as decided by the spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exposure {
    /// Service type ClusterIP; nodes use the cluster IP.
    ClusterIp,
    /// Service type NodePort, optionally with a fixed port; nodes use `127.0.0.1:<nodePort>`.
    NodePort(Option<i32>),
    /// No in-cluster proxy: nodes use this URL.
    External(String),
}

/// One registry after validation, with its freshness rules parsed.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidRegistry {
    /// Registry name (`docker.io`).
    pub name: String,
    /// Upstream URL, defaulted.
    pub url: String,
    /// Parsed freshness rules, in order.
    pub freshness: Vec<ValidFreshness>,
    /// Pin patterns as written (each checked with the registry's own parser).
    pub pin: Vec<String>,
}

/// A freshness rule with its duration parsed.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidFreshness {
    /// Tag glob.
    pub pattern: String,
    /// Revalidation age; `None` when immutable.
    pub max_age: Option<Duration>,
    /// Never revalidated.
    pub immutable: bool,
}

/// S3 storage after validation: the prefix defaulted and normalised, the local cache bound
/// derived.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidS3 {
    /// Base URL of the S3 API without a trailing `/`; AWS S3 when `None`.
    pub endpoint: Option<String>,
    /// Bucket name.
    pub bucket: String,
    /// Signing region.
    pub region: Option<String>,
    /// Key prefix, ending with `/` (default `<namespace>/<name>/`).
    pub prefix: String,
    /// Name of the Secret with `access-key-id` and `secret-access-key`; `None` for ambient
    /// credentials.
    pub credentials_secret: Option<String>,
    /// The emptyDir size limit of each pod's local read cache, as written.
    pub local_cache_size: Quantity,
    /// The registry's bound of that cache: half the limit (the rest stages fetches in flight).
    pub local_cache_max_size_bytes: u64,
    /// Who claims the prefix: `<namespace>/<name>` of the mirror.
    pub owner: String,
}

/// `spec.tls` after validation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidTls {
    /// The `kubernetes.io/tls` Secret with `tls.crt`, `tls.key` and optionally `ca.crt`.
    pub secret_name: String,
    /// The key of that Secret holding the client CA (mTLS), if clients must present a
    /// certificate.
    pub client_ca_key: Option<String>,
    /// The Secret key holding the clients' bearer token, if clients must send one.
    pub bearer_token: Option<SecretKeyRef>,
    /// The `kubernetes.io/tls` Secret whose certificate the nodes present (mTLS only).
    pub node_client_cert_secret: Option<String>,
}

/// The values derived from a valid spec.
#[derive(Debug, Clone, PartialEq)]
pub struct Validated {
    /// Namespace of the mirror.
    pub namespace: String,
    /// Name of the mirror.
    pub name: String,
    /// UID of the mirror (for owner references).
    pub uid: String,
    /// Registries in spec order.
    pub registries: Vec<ValidRegistry>,
    /// The registry for requests without `ns`.
    pub default_registry: String,
    /// Cache size bound in bytes.
    pub max_size_bytes: u64,
    /// How nodes reach the proxy.
    pub exposure: Exposure,
    /// The shared bucket of `storage.type: S3`; `None` for pod-local storage.
    pub s3: Option<ValidS3>,
    /// TLS of the pull API (`spec.tls`); `None` for plain HTTP.
    pub tls: Option<ValidTls>,
}

/// Validates `mirror` and derives what the build stage needs.
///
/// # Errors
/// [`ValidateError`] naming the first offending field.
pub fn validate(mirror: &RegistryMirror) -> Result<Validated, ValidateError> {
    let meta = &mirror.metadata;
    let name = meta
        .name
        .clone()
        .ok_or(ValidateError::MissingMetadata("name"))?;
    let namespace = meta
        .namespace
        .clone()
        .ok_or(ValidateError::MissingMetadata("namespace"))?;
    let uid = meta
        .uid
        .clone()
        .ok_or(ValidateError::MissingMetadata("uid"))?;
    if name.len() > MAX_MIRROR_NAME_LEN {
        return Err(invalid(
            "metadata.name",
            format!(
                "at most {MAX_MIRROR_NAME_LEN} characters (the operator derives object names from it); got {}",
                name.len()
            ),
        ));
    }
    let spec = &mirror.spec;
    let registries = validate_registries(spec)?;
    let default_registry = match &spec.default_registry {
        Some(d) if registries.iter().any(|r| &r.name == d) => d.clone(),
        Some(d) => {
            return Err(invalid(
                "spec.defaultRegistry",
                format!("`{d}` is not one of spec.registries"),
            ))
        }
        None => registries
            .first()
            .map(|r| r.name.clone())
            .ok_or_else(|| invalid("spec.registries", "at least one registry is required"))?,
    };
    if !(1..=10).contains(&spec.replicas) {
        return Err(invalid("spec.replicas", "must be between 1 and 10"));
    }
    if let Some(image) = &spec.image {
        if image.trim().is_empty() || image.chars().any(char::is_whitespace) {
            return Err(invalid(
                "spec.image",
                "must be a non-empty image reference without spaces",
            ));
        }
    }
    let (max_size_bytes, s3) = validate_storage(spec, &namespace, &name)?;
    let exposure = validate_exposure(spec)?;
    if let Some(parent) = &spec.parent {
        check_url(&parent.url).map_err(|m| invalid("spec.parent.url", m))?;
        if let Some(ca) = &parent.ca_config_map {
            validate_reference(
                "ConfigMap",
                "spec.parent.caConfigMap",
                &ca.name,
                Some(&ca.key),
            )?;
        }
        if let Some(id) = &parent.spoke_id {
            cachalot_registry::fleet::parse_spoke_id(id)
                .map_err(|e| invalid("spec.parent.spokeId", e.to_string()))?;
        }
        if matches!(exposure, Exposure::External(_)) {
            return Err(invalid(
                "spec.parent",
                "configures the in-cluster proxy; it cannot be combined with service.type External",
            ));
        }
        validate_parent_credentials(parent)?;
    }
    validate_nodes(&spec.nodes)?;
    let tls = spec
        .tls
        .as_ref()
        .map(|tls| validate_tls(tls, spec, &exposure))
        .transpose()?;
    if spec.nodes.runtime == NodeRuntime::Docker {
        let others: Vec<&str> = registries
            .iter()
            .map(|r| r.name.as_str())
            .filter(|r| *r != "docker.io")
            .collect();
        if !others.is_empty() || default_registry != "docker.io" {
            return Err(invalid(
                "spec.nodes.runtime",
                format!(
                    "Docker Engine mirrors Docker Hub only, through a mirror that serves docker.io by default; this mirror also lists {} (put other registries in a mirror for containerd or CRI-O nodes)",
                    if others.is_empty() { "another default registry".to_string() } else { others.join(", ") }
                ),
            ));
        }
    }
    Ok(Validated {
        namespace,
        name,
        uid,
        registries,
        default_registry,
        max_size_bytes,
        exposure,
        s3,
        tls,
    })
}

/// `spec.tls`: valid names, client authentication with at least one method, and only where
/// the registry and the nodes can use it.
fn validate_tls(
    tls: &MirrorTls,
    spec: &RegistryMirrorSpec,
    exposure: &Exposure,
) -> Result<ValidTls, ValidateError> {
    validate_object_name("Secret", "spec.tls.secretName", &tls.secret_name)?;
    if matches!(exposure, Exposure::External(_)) {
        return Err(invalid(
            "spec.tls",
            "configures the in-cluster proxy; it cannot be combined with service.type External",
        ));
    }
    if spec.nodes.runtime != NodeRuntime::Containerd {
        return Err(invalid(
            "spec.tls",
            "nodes are given the mirror's CA for runtime Containerd only (hosts.toml `ca`); CRI-O and Docker nodes cannot use a TLS mirror yet",
        ));
    }
    let (client_ca_key, bearer_token) = match &tls.client_auth {
        None => (None, None),
        Some(auth) => {
            if auth.ca_secret_key.is_none() && auth.bearer_token_secret.is_none() {
                return Err(invalid(
                    "spec.tls.clientAuth",
                    "set caSecretKey, bearerTokenSecret or both",
                ));
            }
            if let Some(key) = &auth.ca_secret_key {
                if !is_config_map_key(key) || key == TLS_CERT_KEY || key == TLS_KEY_KEY {
                    return Err(invalid(
                        "spec.tls.clientAuth.caSecretKey",
                        format!("`{key}` is not a valid Secret key for a CA (not tls.crt or tls.key; at most 253 of `-._a-zA-Z0-9`)"),
                    ));
                }
            }
            if let Some(token) = &auth.bearer_token_secret {
                validate_reference(
                    "Secret",
                    "spec.tls.clientAuth.bearerTokenSecret",
                    &token.name,
                    Some(&token.key),
                )?;
            }
            if let Some(node) = &auth.node_client_cert_secret {
                validate_node_client_cert(node, auth)?;
            }
            (auth.ca_secret_key.clone(), auth.bearer_token_secret.clone())
        }
    };
    Ok(ValidTls {
        secret_name: tls.secret_name.clone(),
        client_ca_key,
        bearer_token,
        node_client_cert_secret: tls
            .client_auth
            .as_ref()
            .and_then(|a| a.node_client_cert_secret.as_ref())
            .map(|s| s.name.clone()),
    })
}

/// `spec.tls.clientAuth.nodeClientCertSecret`: a valid name, for mTLS alone. Decision: nodes
/// are given no bearer token. containerd could send one (a `header` of the mirror's `[host]`),
/// but it would sit in `hosts.toml`, which every user of the node can read, and in every
/// process that reads the file; a client key is installed mode 0600 instead. With
/// `bearerTokenSecret` as well, the registry requires both, so nodes with a certificate alone
/// would get 401: that combination is refused rather than configured to fail.
fn validate_node_client_cert(
    node: &crate::api::SecretRef,
    auth: &crate::api::ClientAuth,
) -> Result<(), ValidateError> {
    const FIELD: &str = "spec.tls.clientAuth.nodeClientCertSecret";
    validate_reference("Secret", FIELD, &node.name, None)?;
    if auth.ca_secret_key.is_none() {
        return Err(invalid(
            FIELD,
            "a node client certificate is for mTLS: set clientAuth.caSecretKey (the CA that signs it)",
        ));
    }
    if auth.bearer_token_secret.is_some() {
        return Err(invalid(
            FIELD,
            "nodes authenticate by certificate only (a token would sit in the world-readable hosts.toml), and with bearerTokenSecret the mirror requires a token too: drop bearerTokenSecret, or give the nodes a mirror without it",
        ));
    }
    Ok(())
}

/// The key of a `kubernetes.io/tls` Secret holding the certificate chain.
pub const TLS_CERT_KEY: &str = "tls.crt";
/// The key of a `kubernetes.io/tls` Secret holding the private key.
pub const TLS_KEY_KEY: &str = "tls.key";

/// `spec.parent.tls` and `spec.parent.auth`: valid names; a client certificate only for an
/// https parent.
fn validate_parent_credentials(parent: &ParentMirror) -> Result<(), ValidateError> {
    if let Some(tls) = &parent.tls {
        validate_reference(
            "Secret",
            "spec.parent.tls.clientCertSecret",
            &tls.client_cert_secret.name,
            None,
        )?;
        if !parent.url.starts_with("https://") {
            return Err(invalid(
                "spec.parent.tls",
                format!(
                    "a client certificate needs an https parent url, not `{}`",
                    parent.url
                ),
            ));
        }
    }
    if let Some(auth) = &parent.auth {
        let token = &auth.bearer_token_secret;
        validate_reference(
            "Secret",
            "spec.parent.auth.bearerTokenSecret",
            &token.name,
            Some(&token.key),
        )?;
    }
    Ok(())
}

/// A reference at `field` to a `kind` (Secret or ConfigMap) in the mirror's namespace:
/// `{field}.name` must be a valid object name and, for a reference to one key, `{field}.key` a
/// valid key.
fn validate_reference(
    kind: &str,
    field: &str,
    name: &str,
    key: Option<&str>,
) -> Result<(), ValidateError> {
    validate_object_name(kind, &format!("{field}.name"), name)?;
    match key {
        Some(key) if !is_config_map_key(key) => Err(invalid(
            format!("{field}.key"),
            format!(
                "`{key}` is not a valid {kind} key (at most 253 of `-._a-zA-Z0-9`, not `.` and not starting with `..`)"
            ),
        )),
        _ => Ok(()),
    }
}

/// The name of a `kind` at `field` must be a valid object name (a DNS subdomain).
fn validate_object_name(kind: &str, field: &str, name: &str) -> Result<(), ValidateError> {
    if is_dns_subdomain(name) {
        Ok(())
    } else {
        Err(invalid(
            field,
            format!("`{name}` is not a valid {kind} name"),
        ))
    }
}

fn validate_registries(spec: &RegistryMirrorSpec) -> Result<Vec<ValidRegistry>, ValidateError> {
    if spec.registries.is_empty() {
        return Err(invalid(
            "spec.registries",
            "at least one registry is required",
        ));
    }
    if spec.registries.len() > 16 {
        return Err(invalid("spec.registries", "at most 16 registries"));
    }
    let mut out: Vec<ValidRegistry> = Vec::with_capacity(spec.registries.len());
    for (i, r) in spec.registries.iter().enumerate() {
        let field = format!("spec.registries[{i}]");
        cachalot_registry::config::validate_registry_name(&r.name)
            .map_err(|m| invalid(format!("{field}.name"), m))?;
        if r.name.bytes().any(|b| b.is_ascii_uppercase()) {
            return Err(invalid(format!("{field}.name"), "must be lower case"));
        }
        if out.iter().any(|o| o.name == r.name) {
            return Err(invalid(
                format!("{field}.name"),
                format!("`{}` appears more than once", r.name),
            ));
        }
        let url = match &r.url {
            Some(url) => {
                check_url(url).map_err(|m| invalid(format!("{field}.url"), m))?;
                url.trim_end_matches('/').to_string()
            }
            None => cachalot_registry::config::default_url(&r.name),
        };
        if let Some(secret) = &r.credentials_secret {
            validate_reference(
                "Secret",
                &format!("{field}.credentialsSecret"),
                &secret.name,
                None,
            )?;
        }
        if let Some(ca) = &r.ca_config_map {
            validate_reference(
                "ConfigMap",
                &format!("{field}.caConfigMap"),
                &ca.name,
                Some(&ca.key),
            )?;
        }
        if let Some(reserve) = r.budget_reserve {
            if reserve < 0 {
                return Err(invalid(
                    format!("{field}.budgetReserve"),
                    "must not be negative",
                ));
            }
        }
        let freshness = r
            .freshness
            .iter()
            .enumerate()
            .map(|(j, rule)| validate_freshness(rule, &format!("{field}.freshness[{j}]")))
            .collect::<Result<Vec<_>, _>>()?;
        for (j, pattern) in r.pin.iter().enumerate() {
            cachalot_registry::store::PinPattern::parse(pattern, &r.name)
                .map_err(|e| invalid(format!("{field}.pin[{j}]"), e.to_string()))?;
        }
        out.push(ValidRegistry {
            name: r.name.clone(),
            url,
            freshness,
            pin: r.pin.clone(),
        });
    }
    Ok(out)
}

fn validate_freshness(rule: &FreshnessRule, field: &str) -> Result<ValidFreshness, ValidateError> {
    if rule.pattern.is_empty() {
        return Err(invalid(format!("{field}.pattern"), "must not be empty"));
    }
    let max_age = match (&rule.max_age, rule.immutable) {
        (Some(_), true) | (None, false) => {
            return Err(invalid(field, "set either maxAge or immutable: true"))
        }
        (Some(age), false) => {
            Some(parse_go_duration(age).map_err(|m| invalid(format!("{field}.maxAge"), m))?)
        }
        (None, true) => None,
    };
    Ok(ValidFreshness {
        pattern: rule.pattern.clone(),
        max_age,
        immutable: rule.immutable,
    })
}

fn validate_storage(
    spec: &RegistryMirrorSpec,
    namespace: &str,
    name: &str,
) -> Result<(u64, Option<ValidS3>), ValidateError> {
    let storage = &spec.storage;
    let size = storage
        .size
        .as_ref()
        .map(|q| parse_quantity_bytes(&q.0).map_err(|m| invalid("spec.storage.size", m)))
        .transpose()?;
    if storage.kind == StorageKind::PersistentVolumeClaim && size.is_none() {
        return Err(invalid(
            "spec.storage.size",
            "is required for PersistentVolumeClaim storage",
        ));
    }
    if storage.kind != StorageKind::PersistentVolumeClaim && storage.storage_class_name.is_some() {
        return Err(invalid(
            "spec.storage.storageClassName",
            "only applies to PersistentVolumeClaim storage",
        ));
    }
    let s3 = match (storage.kind, &storage.s3) {
        (StorageKind::S3, Some(s3)) => {
            if size.is_some() {
                return Err(invalid(
                    "spec.storage.size",
                    "does not apply to S3 storage; spec.storage.s3.localCacheSize sizes the local read cache",
                ));
            }
            Some(validate_s3(s3, namespace, name)?)
        }
        (StorageKind::S3, None) => {
            return Err(invalid("spec.storage.s3", "is required for S3 storage"))
        }
        (_, Some(_)) => return Err(invalid("spec.storage.s3", "only applies to S3 storage")),
        (_, None) => None,
    };
    let max = storage
        .max_size
        .as_ref()
        .map(|q| parse_quantity_bytes(&q.0).map_err(|m| invalid("spec.storage.maxSize", m)))
        .transpose()?;
    let max_size = match (max, size) {
        (Some(max), Some(size)) if max > size => {
            return Err(invalid(
                "spec.storage.maxSize",
                "must not exceed spec.storage.size",
            ))
        }
        (Some(0), _) => return Err(invalid("spec.storage.maxSize", "must be positive")),
        (Some(max), _) => max,
        // Leave 10% headroom for temporary files of in-flight downloads.
        (None, Some(size)) => size / 10 * 9,
        (None, None) if s3.is_some() => DEFAULT_S3_MAX_SIZE_BYTES,
        (None, None) => DEFAULT_MAX_SIZE_BYTES,
    };
    Ok((max_size, s3))
}

/// Checks the S3 block as the registry will (bucket, endpoint, prefix) so that a mistake is an
/// `InvalidSpec` naming the CRD field, not a config the registry refuses.
fn validate_s3(s3: &S3Storage, namespace: &str, name: &str) -> Result<ValidS3, ValidateError> {
    let field = "spec.storage.s3";
    if !is_bucket_name(&s3.bucket) {
        return Err(invalid(
            format!("{field}.bucket"),
            format!(
                "`{}` is not an S3 bucket name (3-63 of a-z, 0-9, `-`, `.`, starting and ending with a letter or digit)",
                s3.bucket
            ),
        ));
    }
    let endpoint = s3
        .endpoint
        .as_ref()
        .map(|url| {
            check_url(url)
                .map(|()| url.trim_end_matches('/').to_string())
                .map_err(|m| invalid(format!("{field}.endpoint"), m))
        })
        .transpose()?;
    if let Some(region) = &s3.region {
        let ok = !region.is_empty()
            && region.len() <= 64
            && region
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
            && region.starts_with(|c: char| c.is_ascii_alphanumeric());
        if !ok {
            return Err(invalid(
                format!("{field}.region"),
                format!("`{region}` is not a region name (letters, digits, `-`, `_`, `.`)"),
            ));
        }
    }
    let prefix = match &s3.prefix {
        Some(prefix) => {
            check_s3_prefix(prefix).map_err(|m| invalid(format!("{field}.prefix"), m))?;
            prefix.clone()
        }
        None => format!("{namespace}/{name}"),
    };
    let prefix = if prefix.ends_with('/') {
        prefix
    } else {
        format!("{prefix}/")
    };
    let credentials_secret = match &s3.credentials_secret_ref {
        Some(secret) => {
            validate_reference(
                "Secret",
                &format!("{field}.credentialsSecretRef"),
                &secret.name,
                None,
            )?;
            Some(secret.name.clone())
        }
        None => None,
    };
    let local_cache_size = s3
        .local_cache_size
        .clone()
        .unwrap_or_else(|| Quantity(DEFAULT_LOCAL_CACHE_SIZE.to_string()));
    let local = parse_quantity_bytes(&local_cache_size.0)
        .map_err(|m| invalid(format!("{field}.localCacheSize"), m))?;
    if local < MIN_LOCAL_CACHE_SIZE_BYTES {
        return Err(invalid(
            format!("{field}.localCacheSize"),
            "must be at least 64Mi (blobs in flight are staged there)",
        ));
    }
    Ok(ValidS3 {
        endpoint,
        bucket: s3.bucket.clone(),
        region: s3.region.clone(),
        prefix,
        credentials_secret,
        local_cache_size,
        local_cache_max_size_bytes: local / 2,
        owner: format!("{namespace}/{name}"),
    })
}

/// Smallest `storage.s3.localCacheSize`.
const MIN_LOCAL_CACHE_SIZE_BYTES: u64 = 64 * 1024 * 1024;

/// An S3 bucket name as the registry accepts it.
fn is_bucket_name(bucket: &str) -> bool {
    (3..=63).contains(&bucket.len())
        && bucket
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && bucket.starts_with(|c: char| c.is_ascii_alphanumeric())
        && bucket.ends_with(|c: char| c.is_ascii_alphanumeric())
}

/// A bucket key prefix: relative components of `A-Za-z0-9-_.`, none empty or starting with `.`
/// (so no `.` or `..`), an optional trailing `/`.
fn check_s3_prefix(prefix: &str) -> Result<(), String> {
    let body = prefix.strip_suffix('/').unwrap_or(prefix);
    let ok = !body.is_empty()
        && prefix.len() <= 512
        && body.split('/').all(|c| {
            !c.is_empty()
                && !c.starts_with('.')
                && c.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        });
    if ok {
        Ok(())
    } else {
        Err(format!(
            "`{prefix}` must be relative path components of letters, digits, `-`, `_` and `.` (none starting with `.`)"
        ))
    }
}

fn validate_exposure(spec: &RegistryMirrorSpec) -> Result<Exposure, ValidateError> {
    let service = &spec.service;
    if service.kind != ServiceKind::NodePort && service.node_port.is_some() {
        return Err(invalid(
            "spec.service.nodePort",
            "only applies to type NodePort",
        ));
    }
    if service.kind != ServiceKind::External && service.external_url.is_some() {
        return Err(invalid(
            "spec.service.externalUrl",
            "only applies to type External",
        ));
    }
    match service.kind {
        ServiceKind::ClusterIP => Ok(Exposure::ClusterIp),
        ServiceKind::NodePort => {
            if let Some(port) = service.node_port {
                if !(30000..=32767).contains(&port) {
                    return Err(invalid(
                        "spec.service.nodePort",
                        "must be within 30000-32767",
                    ));
                }
            }
            Ok(Exposure::NodePort(service.node_port))
        }
        ServiceKind::External => {
            let url = service.external_url.as_ref().ok_or_else(|| {
                invalid("spec.service.externalUrl", "is required with type External")
            })?;
            check_url(url).map_err(|m| invalid("spec.service.externalUrl", m))?;
            Ok(Exposure::External(url.trim_end_matches('/').to_string()))
        }
    }
}

fn validate_nodes(nodes: &NodeSettings) -> Result<(), ValidateError> {
    for (field, path) in [
        ("spec.nodes.certsDir", &nodes.certs_dir),
        ("spec.nodes.containerdConfig", &nodes.containerd_config),
        ("spec.nodes.registriesConfDir", &nodes.registries_conf_dir),
        ("spec.nodes.dockerConfig", &nodes.docker_config),
    ] {
        check_node_path(path).map_err(|m| invalid(field, m))?;
    }
    if let Some(pid_file) = &nodes.runtime_pid_file {
        check_node_path(pid_file).map_err(|m| invalid("spec.nodes.runtimePidFile", m))?;
    }
    parse_go_duration(&nodes.dial_timeout).map_err(|m| invalid("spec.nodes.dialTimeout", m))?;
    parse_go_duration(&nodes.unreachable_after)
        .map_err(|m| invalid("spec.nodes.unreachableAfter", m))?;
    for (key, value) in &nodes.node_selector {
        if key.is_empty() || key.len() > 317 || value.len() > 63 {
            return Err(invalid(
                format!("spec.nodes.nodeSelector[{key}]"),
                "label keys and values must be Kubernetes label syntax",
            ));
        }
    }
    Ok(())
}

fn check_node_path(path: &str) -> Result<(), String> {
    if !path.starts_with('/') {
        return Err(format!("`{path}` must be an absolute path"));
    }
    if path == "/" {
        return Err("must not be the root directory".to_string());
    }
    if path.split('/').any(|seg| seg == "..") {
        return Err(format!("`{path}` must not contain `..`"));
    }
    if path.contains('\0') {
        return Err("must not contain NUL".to_string());
    }
    Ok(())
}

fn check_url(url: &str) -> Result<(), String> {
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))
        .ok_or_else(|| format!("`{url}` must start with http:// or https://"))?;
    let host = rest.split('/').next().unwrap_or_default();
    if host.is_empty() {
        return Err(format!("`{url}` has no host"));
    }
    if url
        .chars()
        .any(|c| c.is_whitespace() || c == '?' || c == '#')
    {
        return Err(format!(
            "`{url}` must not contain spaces, a query or a fragment"
        ));
    }
    Ok(())
}

fn is_dns_subdomain(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.ends_with(|c: char| c.is_ascii_alphanumeric())
}

/// A ConfigMap key as the API server accepts it (`IsConfigMapKey`). It is also used as a file
/// name in the registry pod, which the `.`/`..` rules keep inside the mount directory.
fn is_config_map_key(key: &str) -> bool {
    !key.is_empty()
        && key.len() <= 253
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_')
        && key != "."
        && !key.starts_with("..")
}

/// Parses a Go-style duration (`500ms`, `3s`, `1m30s`, `6h`); a sign, fractions and `us`/`ns` are
/// refused because neither containerd's users nor the registry need them.
///
/// # Errors
/// A message saying what is wrong.
pub fn parse_go_duration(text: &str) -> Result<Duration, String> {
    if text.is_empty() {
        return Err("empty duration".to_string());
    }
    let mut total = Duration::ZERO;
    let mut rest = text;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return Err(format!(
                "`{text}` is not a duration like 500ms, 3s, 1m30s or 6h"
            ));
        }
        let value: u64 = rest[..digits]
            .parse()
            .map_err(|_| format!("`{text}`: number too large"))?;
        rest = &rest[digits..];
        let (unit, len) = if rest.starts_with("ms") {
            (Duration::from_millis(1), 2)
        } else if rest.starts_with('s') {
            (Duration::from_secs(1), 1)
        } else if rest.starts_with('m') {
            (Duration::from_secs(60), 1)
        } else if rest.starts_with('h') {
            (Duration::from_secs(3600), 1)
        } else {
            return Err(format!("`{text}`: unit must be ms, s, m or h"));
        };
        rest = &rest[len..];
        let part = u32::try_from(value)
            .ok()
            .and_then(|v| unit.checked_mul(v))
            .ok_or_else(|| format!("`{text}`: too long"))?;
        total = total
            .checked_add(part)
            .ok_or_else(|| format!("`{text}`: too long"))?;
    }
    Ok(total)
}

/// Parses a Kubernetes quantity (`10Gi`, `500M`, `1.5Gi`, `1073741824`) into bytes, rounding
/// fractions down.
///
/// # Errors
/// A message saying what is wrong.
pub fn parse_quantity_bytes(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, suffix) = text.split_at(split);
    let multiplier: u128 = match suffix {
        "" => 1,
        "k" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        "T" => 1_000_000_000_000,
        "P" => 1_000_000_000_000_000,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        "Pi" => 1 << 50,
        _ => return Err(format!("`{text}`: unsupported quantity suffix `{suffix}`")),
    };
    let (int_part, frac_part) = number.split_once('.').unwrap_or((number, ""));
    if int_part.is_empty() && frac_part.is_empty() {
        return Err(format!("`{text}` is not a quantity like 10Gi or 500M"));
    }
    if frac_part.len() > 9 || frac_part.contains('.') {
        return Err(format!("`{text}`: too many decimal places"));
    }
    let int: u128 = if int_part.is_empty() {
        0
    } else {
        int_part
            .parse()
            .map_err(|_| format!("`{text}` is not a quantity like 10Gi or 500M"))?
    };
    let frac: u128 = if frac_part.is_empty() {
        0
    } else {
        frac_part
            .parse()
            .map_err(|_| format!("`{text}` is not a quantity like 10Gi or 500M"))?
    };
    let scale = 10u128.pow(u32::try_from(frac_part.len()).unwrap_or(0));
    let bytes = int
        .checked_mul(multiplier)
        .and_then(|v| v.checked_add(frac * multiplier / scale))
        .ok_or_else(|| format!("`{text}`: too large"))?;
    u64::try_from(bytes).map_err(|_| format!("`{text}`: too large"))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    #[test]
    fn go_durations_parse_and_garbage_is_refused() {
        assert_eq!(parse_go_duration("3s").unwrap(), Duration::from_secs(3));
        assert_eq!(parse_go_duration("1m30s").unwrap(), Duration::from_secs(90));
        assert_eq!(
            parse_go_duration("500ms").unwrap(),
            Duration::from_millis(500)
        );
        assert_eq!(parse_go_duration("2h").unwrap(), Duration::from_secs(7200));
        for bad in ["", "3", "s", "3d", "-1s", "1.5s", "3 s"] {
            assert!(parse_go_duration(bad).is_err(), "{bad} should be refused");
        }
    }

    #[test]
    fn quantities_convert_to_bytes() {
        assert_eq!(parse_quantity_bytes("10Gi").unwrap(), 10 << 30);
        assert_eq!(parse_quantity_bytes("500M").unwrap(), 500_000_000);
        assert_eq!(parse_quantity_bytes("1.5Gi").unwrap(), 3 << 29);
        assert_eq!(parse_quantity_bytes("1024").unwrap(), 1024);
        for bad in ["", "Gi", "10GB", "1.2.3Gi", "-1Gi", "100000000Pi"] {
            assert!(
                parse_quantity_bytes(bad).is_err(),
                "{bad} should be refused"
            );
        }
    }

    #[test]
    fn config_map_keys_follow_the_api_server_rules() {
        for good in ["ca.crt", "ca-bundle.pem", "CA_1", ".hidden", "a..b"] {
            assert!(is_config_map_key(good), "{good} should be accepted");
        }
        let long = "k".repeat(254);
        for bad in [
            "",
            ".",
            "..",
            "..data",
            "ca/crt",
            "ca crt",
            "ca:crt",
            long.as_str(),
        ] {
            assert!(!is_config_map_key(bad), "{bad} should be refused");
        }
    }

    #[test]
    fn bucket_names_and_prefixes_follow_the_registry_rules() {
        for good in ["cachalot", "my.bucket-1", "abc"] {
            assert!(is_bucket_name(good), "{good} should be accepted");
        }
        for bad in ["ab", "Bucket", "-bucket", "bucket-", "a_b", ""] {
            assert!(!is_bucket_name(bad), "{bad} should be refused");
        }
        for good in ["mirrors", "mirrors/hub/", "team-a/hub", "a.b/c_d"] {
            assert!(check_s3_prefix(good).is_ok(), "{good} should be accepted");
        }
        for bad in [
            "",
            "/",
            "/abs",
            "a//b",
            "a/../b",
            "./a",
            "a/.hidden",
            "a b",
            "a/b//",
        ] {
            assert!(check_s3_prefix(bad).is_err(), "{bad} should be refused");
        }
    }

    #[test]
    fn node_paths_must_be_absolute_without_dotdot() {
        assert!(check_node_path("/etc/containerd/certs.d").is_ok());
        assert!(check_node_path("etc/containerd").is_err());
        assert!(check_node_path("/etc/../root").is_err());
        assert!(check_node_path("/").is_err());
    }
}
