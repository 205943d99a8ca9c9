//! Registry configuration: read → parse → normalise → validate, once, at startup.
//!
//! The YAML form is camelCase and rejects unknown fields, so a typo is a startup error naming the
//! field instead of a silently ignored setting. The operator renders this very type into the
//! registry's ConfigMap, so the two cannot drift. Credentials never appear here: only paths of files
//! (a mounted Secret) that hold them.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The registry `docker.io` stands for, and where it really lives.
pub const DOCKER_HUB: &str = "docker.io";
pub const DOCKER_HUB_URL: &str = "https://registry-1.docker.io";

/// The whole configuration file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Config {
    /// Address of the public listener: the distribution API (`/v2/`) and the health endpoints.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Address of the admin listener: `/metrics`, `/stats`, the health endpoints and `/admin/`.
    /// Its own port, so that who can pull cannot read the figures (or reach admin actions).
    #[serde(default = "default_admin_listen")]
    pub admin_listen: SocketAddr,
    /// The registry used for requests without `?ns=`.
    #[serde(default = "default_registry")]
    pub default_registry: String,
    #[serde(default)]
    pub storage: StorageConfig,
    /// Another cachalot (the hub) to fetch every registry through, passing `ns` along.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<ParentConfig>,
    /// The other replicas of this mirror (see [`ClusterConfig`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<ClusterConfig>,
    /// The upstream registries this mirror may serve, keyed by registry name (`docker.io`,
    /// `ghcr.io`, `registry.example:5000`). Requests for any other `ns` are refused.
    #[serde(default)]
    pub registries: BTreeMap<String, RegistryConfig>,
    /// A YAML file mapping registry names to pin lists (the syntax of `registries.<name>.pin`),
    /// re-read at every eviction pass. Missing means no extra pins; an invalid file keeps the
    /// pins last read from it. The operator mounts the images of running Pods here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pin_file: Option<PathBuf>,
    #[serde(default)]
    pub upstream: UpstreamTuning,
    #[serde(default)]
    pub server: ServerTuning,
    #[serde(default)]
    pub log: LogConfig,
    /// Serve the listener over TLS (see [`TlsConfig`]); plain HTTP when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsConfig>,
    /// Client authentication for the pull API (see [`ClientAuthConfig`]); open when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<ClientAuthConfig>,
}

/// The listener's TLS certificate, re-read when its files change (a new certificate that does
/// not load keeps the last good one).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain, the server's certificate first.
    pub cert_file: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key_file: PathBuf,
    /// PEM CA bundle: when given, a client must present a certificate signed by it (mTLS), else
    /// the handshake fails. Read once at start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_ca_file: Option<PathBuf>,
}

/// How clients of the pull API (`/v2/`) authenticate; the health endpoints stay open.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ClientAuthConfig {
    /// A file holding the token clients send as `Authorization: Bearer <token>` (surrounding
    /// white space ignored), re-read when it changes.
    pub bearer_token_file: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct StorageConfig {
    /// Directory of the content-addressed cache.
    #[serde(default = "default_storage_path")]
    pub path: PathBuf,
    /// Size bound of the cache; least recently used content is evicted beyond it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_size_bytes: Option<u64>,
    /// How often the last use of cached content (the LRU order) is written to disk, in one batch;
    /// also written at shutdown. A crash loses at most this much of the order (never content).
    #[serde(
        default = "default_last_use_flush_interval",
        with = "humantime_serde",
        skip_serializing_if = "is_default_last_use_flush_interval"
    )]
    pub last_use_flush_interval: Duration,
    /// Shared S3-compatible object storage. With it, `path` is a bounded local read cache (and the
    /// staging area of fetches in flight) and `maxSizeBytes` bounds the bucket prefix.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub s3: Option<S3Config>,
}

/// An S3-compatible bucket (prefix) shared by the replicas of one mirror.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct S3Config {
    /// Base URL of the S3 API (path-style requests); AWS S3 when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    pub bucket: String,
    /// Signing region; `us-east-1` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// Key prefix of this mirror's objects (`mirrors/dockerhub/`), so several mirrors can share a
    /// bucket. Empty: the whole bucket. A prefix is claimed by one mirror (`self`'s name).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub prefix: String,
    /// Files holding the access key pair (a mounted Secret); both or neither. Neither: the
    /// standard AWS environment (variables, web identity, instance metadata).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_key_id_file: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_access_key_file: Option<PathBuf>,
    /// Bound of the local read cache under `storage.path`; defaults to the smaller of
    /// `maxSizeBytes` and 10 GiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local_cache_max_size_bytes: Option<u64>,
    /// No object of the bucket used or written within this is evicted. Default: twice
    /// `lastUseFlushInterval` plus a minute, at least 10 minutes. Shorter than twice the flush
    /// interval, eviction may delete what a replica is about to serve (a miss, never wrong bytes).
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub eviction_grace: Option<Duration>,
    /// Who owns the prefix: a mirror refuses to start on a prefix another mirror claimed.
    /// Defaults to `default`; the operator sets the RegistryMirror's namespace/name.
    #[serde(default = "default_s3_owner")]
    pub owner: String,
}

/// The replicas of one mirror, which share one upstream fetch per object (rendezvous hashing).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ClusterConfig {
    /// This replica's base URL as the others reach it (`http://mirror-0.mirror-peers:5000`).
    /// Required, here or from `--cluster-self` / `CACHALOT_CLUSTER_SELF`.
    #[serde(rename = "self", default, skip_serializing_if = "String::is_empty")]
    pub self_url: String,
    /// Every replica's base URL, this one included (it is added when missing).
    #[serde(default)]
    pub peers: Vec<String>,
    /// How long a peer may take to accept a connection and answer with headers before the
    /// request is served directly instead (and the peer is skipped for `circuitOpenFor`).
    #[serde(default = "default_peer_timeout", with = "humantime_serde")]
    pub peer_timeout: Duration,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ParentConfig {
    /// Base URL of the parent mirror, for example `http://hub.example:5000`.
    pub url: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub insecure_skip_verify: bool,
    /// How this mirror names itself to the parent (the `X-Cachalot-Spoke` header), so the hub
    /// lists it under `spokes` in its `/stats`: 1 to 128 of `[A-Za-z0-9._/:@-]`, stable across
    /// restarts and replicas (the operator sets `<cluster>/<namespace>/<name>`). Defaults to the
    /// host name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spoke_id: Option<String>,
    /// PEM client certificate chain and key presented to an https parent that asks for one
    /// (mTLS); both or neither. Read once at start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_cert_file: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_key_file: Option<PathBuf>,
    /// A file holding the token sent to the parent as `Authorization: Bearer <token>`, re-read
    /// when it changes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bearer_token_file: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RegistryConfig {
    /// Base URL of the upstream registry. Defaults to `https://<name>`, and to
    /// `https://registry-1.docker.io` for `docker.io`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials: Option<Credentials>,
    /// Freshness rules by tag pattern, first match wins; the built-in defaults apply after them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub freshness: Vec<FreshnessRule>,
    /// When the upstream's remaining pull budget is at or below this, a cached (stale) tag is
    /// served instead of spending a counted GET on a changed digest.
    #[serde(default)]
    pub budget_reserve: u64,
    /// `REPOSITORY[:TAG]` patterns (globs `*` and `?`; no tag means every tag) or exact
    /// `REPOSITORY@DIGEST` references whose cached content eviction never removes: the manifest,
    /// the cached children of an index, and their config and layer blobs. On `docker.io` a
    /// one-component repository gets `library/`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pin: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub insecure_skip_verify: bool,
    /// Hosts besides the registry's own that may receive the credentials when the registry's
    /// Bearer challenge names a token realm there (host names, no port). Built in:
    /// `auth.docker.io` for `docker.io`, `gitlab.com` for `registry.gitlab.com`. Anonymous token
    /// requests may go to any realm.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub token_hosts: Vec<String>,
    /// How long an upstream 404 for a tag (or for the repository's `tags/list`) is remembered
    /// and answered without asking again; default 30 s, `0s` turns it off. A freshness rule's
    /// `notFoundMaxAge` overrides it for its tags.
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub not_found_max_age: Option<Duration>,
    /// The same for an upstream 404 for a digest (manifest or blob); default 10 s.
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub digest_not_found_max_age: Option<Duration>,
}

/// Files holding upstream credentials (a mounted Secret). Either a username/password pair or a
/// docker `config.json`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Credentials {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username_file: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_file: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub docker_config_file: Option<PathBuf>,
}

/// How long a cached tag is trusted before it is revalidated upstream with a HEAD.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FreshnessRule {
    /// Glob over the tag (`latest`, `v*`, `*-alpine`).
    pub pattern: String,
    /// Optional glob over the repository (`library/*`); all repositories when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repository: Option<String>,
    /// How long the tag is trusted without asking upstream.
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub max_age: Option<Duration>,
    /// Never revalidate tags matching this rule.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub immutable: bool,
    /// How long an upstream 404 for a matching tag is remembered (overrides the registry's
    /// `notFoundMaxAge`; `0s` turns it off for these tags).
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub not_found_max_age: Option<Duration>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UpstreamTuning {
    #[serde(default = "default_connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Deadline for the upstream's response headers.
    #[serde(default = "default_response_timeout", with = "humantime_serde")]
    pub response_timeout: Duration,
    /// Longest pause between two chunks of an upstream body.
    #[serde(default = "default_body_idle_timeout", with = "humantime_serde")]
    pub body_idle_timeout: Duration,
    /// Retries of idempotent requests after connection errors (never after an HTTP answer).
    #[serde(default = "default_retries")]
    pub retries: u32,
    /// Consecutive failures after which the circuit opens and requests fail fast.
    #[serde(default = "default_circuit_threshold")]
    pub circuit_failure_threshold: u32,
    /// How long an open circuit waits before letting one probe request through.
    #[serde(default = "default_circuit_open_for", with = "humantime_serde")]
    pub circuit_open_for: Duration,
    /// How long a request for a cached tag past its `maxAge` waits for the revalidation `HEAD`
    /// (counted from when that HEAD started). After that it is answered from the cache
    /// (`X-Cache: STALE`) while the HEAD finishes in the background. `0s` never waits.
    #[serde(default = "default_revalidate_wait", with = "humantime_serde")]
    pub revalidate_wait: Duration,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServerTuning {
    /// Deadline for a client to send its request headers.
    #[serde(default = "default_header_read_timeout", with = "humantime_serde")]
    pub header_read_timeout: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LogConfig {
    #[serde(default)]
    pub format: LogFormat,
    /// A tracing filter such as `info` or `cachalot_registry=debug`; `RUST_LOG` overrides it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub level: Option<String>,
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 5000))
}
fn default_admin_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 5001))
}
fn default_registry() -> String {
    DOCKER_HUB.to_owned()
}
fn default_storage_path() -> PathBuf {
    PathBuf::from("cachalot-data")
}
fn default_connect_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_response_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_body_idle_timeout() -> Duration {
    Duration::from_secs(60)
}
fn default_retries() -> u32 {
    2
}
fn default_circuit_threshold() -> u32 {
    5
}
fn default_circuit_open_for() -> Duration {
    Duration::from_secs(15)
}
fn default_revalidate_wait() -> Duration {
    Duration::from_secs(1)
}
fn default_header_read_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_last_use_flush_interval() -> Duration {
    Duration::from_secs(30)
}
fn default_s3_owner() -> String {
    "default".to_owned()
}
fn default_peer_timeout() -> Duration {
    Duration::from_secs(2)
}
/// Whether two listen addresses would claim the same socket: the same port (not 0, which the
/// kernel picks) on the same address, or on two addresses of which one is a wildcard.
#[must_use]
pub fn listeners_collide(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() != 0
        && a.port() == b.port()
        && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}

/// Default bound of the local read cache in S3 mode.
pub const DEFAULT_LOCAL_CACHE_MAX_SIZE: u64 = 10 * 1024 * 1024 * 1024;
fn is_default_last_use_flush_interval(d: &Duration) -> bool {
    *d == default_last_use_flush_interval()
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: default_listen(),
            admin_listen: default_admin_listen(),
            default_registry: default_registry(),
            storage: StorageConfig::default(),
            parent: None,
            cluster: None,
            registries: BTreeMap::new(),
            pin_file: None,
            upstream: UpstreamTuning::default(),
            server: ServerTuning::default(),
            log: LogConfig::default(),
            tls: None,
            auth: None,
        }
    }
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            path: default_storage_path(),
            max_size_bytes: None,
            last_use_flush_interval: default_last_use_flush_interval(),
            s3: None,
        }
    }
}

impl Default for UpstreamTuning {
    fn default() -> Self {
        UpstreamTuning {
            connect_timeout: default_connect_timeout(),
            response_timeout: default_response_timeout(),
            body_idle_timeout: default_body_idle_timeout(),
            retries: default_retries(),
            circuit_failure_threshold: default_circuit_threshold(),
            circuit_open_for: default_circuit_open_for(),
            revalidate_wait: default_revalidate_wait(),
        }
    }
}

impl Default for ServerTuning {
    fn default() -> Self {
        ServerTuning {
            header_read_timeout: default_header_read_timeout(),
        }
    }
}

/// Why the configuration was refused. Every variant names the offending field.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {source}")]
    Parse {
        path: PathBuf,
        source: serde_yaml::Error,
    },
    #[error("--upstream {0}: expected REGISTRY=URL")]
    UpstreamFlag(String),
    #[error("{field}: {message}")]
    Invalid { field: String, message: String },
}

fn invalid(field: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field: field.into(),
        message: message.into(),
    }
}

/// Command-line values that override the file.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub listen: Option<SocketAddr>,
    pub admin_listen: Option<SocketAddr>,
    pub storage: Option<PathBuf>,
    /// `REGISTRY=URL` pairs.
    pub upstreams: Vec<String>,
    /// `cluster.self`; requires a `cluster` section.
    pub cluster_self: Option<String>,
}

impl Config {
    /// Parses YAML text; unknown fields are errors.
    pub fn from_yaml(text: &str, path: &Path) -> Result<Config, ConfigError> {
        serde_yaml::from_str(text).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source,
        })
    }

    /// Reads the optional file, applies the overrides, normalises and validates.
    pub fn load(file: Option<&Path>, overrides: &Overrides) -> Result<Config, ConfigError> {
        let mut config = match file {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.to_owned(),
                    source,
                })?;
                Config::from_yaml(&text, path)?
            }
            None => Config::default(),
        };
        config.apply(overrides)?;
        config.normalise();
        config.validate()?;
        Ok(config)
    }

    fn apply(&mut self, overrides: &Overrides) -> Result<(), ConfigError> {
        if let Some(listen) = overrides.listen {
            self.listen = listen;
        }
        if let Some(admin_listen) = overrides.admin_listen {
            self.admin_listen = admin_listen;
        }
        if let Some(storage) = &overrides.storage {
            self.storage.path = storage.clone();
        }
        if let Some(url) = &overrides.cluster_self {
            match &mut self.cluster {
                Some(cluster) => cluster.self_url = url.clone(),
                None => {
                    return Err(invalid(
                        "cluster.self",
                        "--cluster-self given, but the config has no `cluster` section",
                    ))
                }
            }
        }
        for pair in &overrides.upstreams {
            let (registry, url) = pair
                .split_once('=')
                .filter(|(r, u)| !r.is_empty() && !u.is_empty())
                .ok_or_else(|| ConfigError::UpstreamFlag(pair.clone()))?;
            self.registries.entry(registry.to_owned()).or_default().url = Some(url.to_owned());
        }
        Ok(())
    }

    /// Fills in what the defaults imply: docker.io when no registry is configured, and each
    /// registry's URL.
    pub fn normalise(&mut self) {
        if self.registries.is_empty() {
            self.registries
                .insert(DOCKER_HUB.to_owned(), RegistryConfig::default());
        }
        for (name, registry) in &mut self.registries {
            if registry.url.is_none() {
                registry.url = Some(default_url(name));
            }
            if let Some(url) = &mut registry.url {
                while url.ends_with('/') {
                    url.pop();
                }
            }
        }
        if let Some(parent) = &mut self.parent {
            while parent.url.ends_with('/') {
                parent.url.pop();
            }
        }
        if let Some(cluster) = &mut self.cluster {
            let trim = |url: &mut String| {
                while url.ends_with('/') {
                    url.pop();
                }
            };
            trim(&mut cluster.self_url);
            cluster.peers.iter_mut().for_each(trim);
            if !cluster.self_url.is_empty() && !cluster.peers.contains(&cluster.self_url) {
                cluster.peers.push(cluster.self_url.clone());
            }
            cluster.peers.sort();
            cluster.peers.dedup();
        }
        if let Some(s3) = &mut self.storage.s3 {
            if let Some(endpoint) = &mut s3.endpoint {
                while endpoint.ends_with('/') {
                    endpoint.pop();
                }
            }
            if !s3.prefix.is_empty() && !s3.prefix.ends_with('/') {
                s3.prefix.push('/');
            }
        }
    }

    /// Whether the public listener takes plain HTTP from anyone (no `tls`, no `auth`): then the
    /// replicas of a `cluster` forward to each other there, else on the admin listener.
    #[must_use]
    pub fn public_listener_is_open(&self) -> bool {
        self.tls.is_none() && self.auth.is_none()
    }

    /// Checks everything that serde cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if listeners_collide(self.listen, self.admin_listen) {
            return Err(invalid(
                "adminListen",
                format!(
                    "{} collides with listen ({}): the admin listener needs its own port",
                    self.admin_listen, self.listen
                ),
            ));
        }
        if !self.registries.contains_key(&self.default_registry) {
            return Err(invalid(
                "defaultRegistry",
                format!(
                    "`{}` is not one of the configured registries ({})",
                    self.default_registry,
                    self.registries
                        .keys()
                        .cloned()
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ));
        }
        for (name, registry) in &self.registries {
            let field = format!("registries.{name}");
            validate_registry_name(name).map_err(|m| invalid(field.clone(), m))?;
            if let Some(url) = &registry.url {
                validate_url(url).map_err(|m| invalid(format!("{field}.url"), m))?;
            }
            if let Some(c) = &registry.credentials {
                let pair = c.username_file.is_some() || c.password_file.is_some();
                if pair && (c.username_file.is_none() || c.password_file.is_none()) {
                    return Err(invalid(
                        format!("{field}.credentials"),
                        "usernameFile and passwordFile must be given together",
                    ));
                }
                if pair && c.docker_config_file.is_some() {
                    return Err(invalid(
                        format!("{field}.credentials"),
                        "give either usernameFile/passwordFile or dockerConfigFile, not both",
                    ));
                }
                if !pair && c.docker_config_file.is_none() {
                    return Err(invalid(
                        format!("{field}.credentials"),
                        "needs usernameFile and passwordFile, or dockerConfigFile",
                    ));
                }
            }
            for (i, rule) in registry.freshness.iter().enumerate() {
                let rf = format!("{field}.freshness[{i}]");
                globset::Glob::new(&rule.pattern)
                    .map_err(|e| invalid(format!("{rf}.pattern"), e.to_string()))?;
                if let Some(repo) = &rule.repository {
                    globset::Glob::new(repo)
                        .map_err(|e| invalid(format!("{rf}.repository"), e.to_string()))?;
                }
                match (rule.immutable, rule.max_age) {
                    (true, Some(_)) => {
                        return Err(invalid(rf, "give either maxAge or immutable, not both"))
                    }
                    (false, None) => return Err(invalid(rf, "needs maxAge or immutable: true")),
                    _ => {}
                }
                validate_not_found_max_age(
                    &format!("{rf}.notFoundMaxAge"),
                    rule.not_found_max_age,
                )?;
            }
            for (i, host) in registry.token_hosts.iter().enumerate() {
                validate_token_host(host)
                    .map_err(|m| invalid(format!("{field}.tokenHosts[{i}]"), m))?;
            }
            validate_not_found_max_age(
                &format!("{field}.notFoundMaxAge"),
                registry.not_found_max_age,
            )?;
            validate_not_found_max_age(
                &format!("{field}.digestNotFoundMaxAge"),
                registry.digest_not_found_max_age,
            )?;
        }
        crate::store::PinRules::from_config(self)?;
        if let Some(parent) = &self.parent {
            validate_url(&parent.url).map_err(|m| invalid("parent.url", m))?;
            if let Some(id) = &parent.spoke_id {
                crate::fleet::parse_spoke_id(id)
                    .map_err(|e| invalid("parent.spokeId", e.to_string()))?;
            }
            if parent.client_cert_file.is_some() != parent.client_key_file.is_some() {
                return Err(invalid(
                    "parent",
                    "clientCertFile and clientKeyFile must be given together",
                ));
            }
        }
        if self.cluster.is_some()
            && !self.public_listener_is_open()
            && self.admin_listen.port() == 0
        {
            // Replicas then forward to each other's admin listener, on this port.
            return Err(invalid(
                "adminListen",
                "with `cluster` and `tls` or `auth`, replicas reach each other on the admin port: it must be a fixed port, the same on every replica",
            ));
        }
        if let Some(s3) = &self.storage.s3 {
            validate_s3(s3)?;
        }
        if let Some(cluster) = &self.cluster {
            if cluster.self_url.is_empty() {
                return Err(invalid(
                    "cluster.self",
                    "required (in the file, or --cluster-self / CACHALOT_CLUSTER_SELF)",
                ));
            }
            validate_url(&cluster.self_url).map_err(|m| invalid("cluster.self", m))?;
            for (i, peer) in cluster.peers.iter().enumerate() {
                validate_url(peer).map_err(|m| invalid(format!("cluster.peers[{i}]"), m))?;
            }
            if cluster.peers.len() > MAX_PEERS {
                return Err(invalid("cluster.peers", format!("at most {MAX_PEERS}")));
            }
            if cluster.peer_timeout.is_zero() || cluster.peer_timeout > Duration::from_secs(60) {
                return Err(invalid("cluster.peerTimeout", "between 1ms and 1m"));
            }
        }
        let flush = self.storage.last_use_flush_interval;
        if flush < Duration::from_secs(1) || flush > Duration::from_secs(3600) {
            return Err(invalid("storage.lastUseFlushInterval", "between 1s and 1h"));
        }
        if self.upstream.connect_timeout.is_zero() {
            return Err(invalid("upstream.connectTimeout", "must be positive"));
        }
        if self.upstream.response_timeout.is_zero() {
            return Err(invalid("upstream.responseTimeout", "must be positive"));
        }
        if self.upstream.retries > 10 {
            return Err(invalid("upstream.retries", "at most 10"));
        }
        if self.upstream.revalidate_wait > MAX_REVALIDATE_WAIT {
            return Err(invalid("upstream.revalidateWait", "at most 1m"));
        }
        if self.upstream.circuit_failure_threshold == 0 {
            return Err(invalid(
                "upstream.circuitFailureThreshold",
                "must be at least 1",
            ));
        }
        Ok(())
    }
}

/// Most replicas a mirror may have.
const MAX_PEERS: usize = 64;

/// The S3 settings serde cannot check: a valid bucket name, a relative prefix without `..`,
/// an http(s) endpoint and the key files given together.
fn validate_s3(s3: &S3Config) -> Result<(), ConfigError> {
    let bucket = &s3.bucket;
    let bucket_ok = (3..=63).contains(&bucket.len())
        && bucket
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && bucket
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_alphanumeric())
        && bucket
            .bytes()
            .last()
            .is_some_and(|b| b.is_ascii_alphanumeric());
    if !bucket_ok {
        return Err(invalid(
            "storage.s3.bucket",
            format!("`{bucket}` is not an S3 bucket name (3-63 of a-z, 0-9, `-`, `.`)"),
        ));
    }
    if let Some(endpoint) = &s3.endpoint {
        validate_url(endpoint).map_err(|m| invalid("storage.s3.endpoint", m))?;
    }
    let prefix = &s3.prefix;
    let prefix_ok = !prefix.starts_with('/')
        && prefix
            .trim_end_matches('/')
            .split('/')
            .all(|c| prefix.is_empty() || (!c.is_empty() && c != "." && c != ".."))
        && prefix
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./".contains(&b));
    if !prefix_ok {
        return Err(invalid(
            "storage.s3.prefix",
            format!("`{prefix}` must be relative path components of a-z, 0-9, `-`, `_`, `.`"),
        ));
    }
    if s3.access_key_id_file.is_some() != s3.secret_access_key_file.is_some() {
        return Err(invalid(
            "storage.s3",
            "accessKeyIdFile and secretAccessKeyFile must be given together",
        ));
    }
    if s3.owner.is_empty() || s3.owner.len() > 253 {
        return Err(invalid("storage.s3.owner", "1 to 253 characters"));
    }
    Ok(())
}

/// Upper bound of `upstream.revalidateWait`.
const MAX_REVALIDATE_WAIT: Duration = Duration::from_secs(60);
/// Upper bound of the `notFoundMaxAge` settings: a 404 is never remembered longer.
pub const MAX_NOT_FOUND_MAX_AGE: Duration = Duration::from_secs(24 * 3600);

fn validate_not_found_max_age(field: &str, value: Option<Duration>) -> Result<(), ConfigError> {
    match value {
        Some(v) if v > MAX_NOT_FOUND_MAX_AGE => Err(invalid(field, "at most 24h")),
        _ => Ok(()),
    }
}

/// A token host is a host name without port or scheme.
fn validate_token_host(host: &str) -> Result<(), String> {
    if host.contains(':') || host.contains('/') {
        return Err(format!(
            "`{host}` must be a host name only (no scheme, port or path)"
        ));
    }
    validate_registry_name(host).map_err(|_| format!("`{host}` is not a host name"))
}

/// The upstream URL a registry name means when none is configured.
pub fn default_url(registry: &str) -> String {
    if registry == DOCKER_HUB {
        DOCKER_HUB_URL.to_owned()
    } else {
        format!("https://{registry}")
    }
}

/// A registry name is a host name with an optional port: it becomes a directory name in the store
/// and a value of `ns`, so it is checked strictly.
pub fn validate_registry_name(name: &str) -> Result<(), String> {
    let (host, port) = match name.rsplit_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (name, None),
    };
    let host_ok = !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        });
    if !host_ok {
        return Err(format!("`{name}` is not a registry host name"));
    }
    if let Some(port) = port {
        if port.parse::<u16>().map_or(true, |p| p == 0) {
            return Err(format!("`{name}` has an invalid port"));
        }
    }
    Ok(())
}

fn validate_url(url: &str) -> Result<(), String> {
    let parsed = reqwest::Url::parse(url).map_err(|e| format!("`{url}` is not a URL: {e}"))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(format!("`{url}` must use http or https"));
    }
    if parsed.host_str().is_none() {
        return Err(format!("`{url}` has no host"));
    }
    if parsed.query().is_some() || parsed.fragment().is_some() {
        return Err(format!("`{url}` must not have a query or fragment"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    fn load_yaml(text: &str) -> Result<Config, ConfigError> {
        let mut c = Config::from_yaml(text, Path::new("test.yaml"))?;
        c.normalise();
        c.validate()?;
        Ok(c)
    }

    #[test]
    fn empty_config_serves_docker_hub_on_port_5000() {
        let c = Config::load(None, &Overrides::default()).unwrap();
        assert_eq!(c.listen.port(), 5000);
        assert_eq!(c.admin_listen, "0.0.0.0:5001".parse().unwrap());
        assert_eq!(c.default_registry, "docker.io");
        assert_eq!(
            c.registries["docker.io"].url.as_deref(),
            Some("https://registry-1.docker.io")
        );
    }

    #[test]
    fn unknown_fields_are_refused_with_their_name() {
        let err = load_yaml("registries:\n  docker.io:\n    urll: http://x\n").unwrap_err();
        assert!(err.to_string().contains("urll"), "{err}");
        let err = load_yaml("listne: 0.0.0.0:1\n").unwrap_err();
        assert!(err.to_string().contains("listne"), "{err}");
    }

    #[test]
    fn invalid_values_name_the_field() {
        for (yaml, field) in [
            (
                "registries:\n  docker.io:\n    url: ftp://x\n",
                "registries.docker.io.url",
            ),
            ("defaultRegistry: quay.io\n", "defaultRegistry"),
            (
                "registries:\n  \"../x\": {}\ndefaultRegistry: ../x\n",
                "registries.../x",
            ),
            (
                "registries:\n  docker.io:\n    freshness:\n    - pattern: latest\n",
                "registries.docker.io.freshness[0]",
            ),
            (
                "registries:\n  docker.io:\n    pin: [\"nginx:stable\", \"Nginx\"]\n",
                "registries.docker.io.pin[1]: `Nginx`",
            ),
            (
                "registries:\n  docker.io:\n    pin: [\"redis:\"]\n",
                "registries.docker.io.pin[0]",
            ),
            (
                "registries:\n  docker.io:\n    tokenHosts: [auth.docker.io, \"https://x\"]\n",
                "registries.docker.io.tokenHosts[1]",
            ),
            (
                "registries:\n  docker.io:\n    notFoundMaxAge: 2d\n",
                "registries.docker.io.notFoundMaxAge",
            ),
            (
                "registries:\n  docker.io:\n    freshness:\n    - { pattern: x, maxAge: 1m, notFoundMaxAge: 30h }\n",
                "registries.docker.io.freshness[0].notFoundMaxAge",
            ),
            ("upstream: { revalidateWait: 2m }\n", "upstream.revalidateWait"),
        ] {
            let err = load_yaml(yaml).unwrap_err();
            assert!(err.to_string().starts_with(field), "{yaml}: {err}");
        }
    }

    #[test]
    fn s3_storage_and_cluster_are_normalised_and_checked() {
        let c = load_yaml(
            "storage:\n  s3: { endpoint: 'http://127.0.0.1:3900/', bucket: cachalot, prefix: mirrors/hub }\n\
             cluster: { self: 'http://b:5000/', peers: ['http://a:5000', 'http://a:5000'] }\n",
        )
        .unwrap();
        let s3 = c.storage.s3.as_ref().unwrap();
        assert_eq!(s3.endpoint.as_deref(), Some("http://127.0.0.1:3900"));
        assert_eq!(s3.prefix, "mirrors/hub/");
        assert_eq!(s3.owner, "default");
        let cluster = c.cluster.as_ref().unwrap();
        assert_eq!(cluster.self_url, "http://b:5000");
        assert_eq!(cluster.peers, vec!["http://a:5000", "http://b:5000"]);
        assert_eq!(cluster.peer_timeout, Duration::from_secs(2));
        for (yaml, field) in [
            (
                "storage: { s3: { bucket: Bad_Name } }\n",
                "storage.s3.bucket",
            ),
            ("storage: { s3: { bucket: ab } }\n", "storage.s3.bucket"),
            (
                "storage: { s3: { bucket: ok-bucket, prefix: /abs } }\n",
                "storage.s3.prefix",
            ),
            (
                "storage: { s3: { bucket: ok-bucket, prefix: a/../b } }\n",
                "storage.s3.prefix",
            ),
            (
                "storage: { s3: { bucket: ok-bucket, endpoint: 'ftp://x' } }\n",
                "storage.s3.endpoint",
            ),
            (
                "storage: { s3: { bucket: ok-bucket, accessKeyIdFile: /k } }\n",
                "storage.s3",
            ),
            ("cluster: { self: 'not a url' }\n", "cluster.self"),
            (
                "cluster: { self: 'http://a', peerTimeout: 0s }\n",
                "cluster.peerTimeout",
            ),
        ] {
            let err = load_yaml(yaml).unwrap_err();
            assert!(err.to_string().starts_with(field), "{yaml}: {err}");
        }
    }

    #[test]
    fn last_use_flush_interval_defaults_to_30s_is_bounded_and_rendered_only_when_set() {
        let c = load_yaml("{}").unwrap();
        assert_eq!(c.storage.last_use_flush_interval, Duration::from_secs(30));
        assert!(!serde_yaml::to_string(&c)
            .unwrap()
            .contains("lastUseFlushInterval"));
        let c = load_yaml("storage: { lastUseFlushInterval: 5s }\n").unwrap();
        assert_eq!(c.storage.last_use_flush_interval, Duration::from_secs(5));
        assert!(serde_yaml::to_string(&c)
            .unwrap()
            .contains("lastUseFlushInterval: 5s"));
        for bad in ["0s", "500ms", "2h"] {
            let err =
                load_yaml(&format!("storage: {{ lastUseFlushInterval: {bad} }}\n")).unwrap_err();
            assert!(
                err.to_string().starts_with("storage.lastUseFlushInterval"),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn upstream_flags_override_and_add_registries() {
        let overrides = Overrides {
            upstreams: vec![
                "docker.io=http://127.0.0.1:1".into(),
                "quay.io=http://127.0.0.1:2/".into(),
            ],
            ..Overrides::default()
        };
        let c = Config::load(None, &overrides).unwrap();
        assert_eq!(
            c.registries["docker.io"].url.as_deref(),
            Some("http://127.0.0.1:1")
        );
        assert_eq!(
            c.registries["quay.io"].url.as_deref(),
            Some("http://127.0.0.1:2")
        );
        let bad = Overrides {
            upstreams: vec!["nourl".into()],
            ..Overrides::default()
        };
        assert!(matches!(
            Config::load(None, &bad),
            Err(ConfigError::UpstreamFlag(_))
        ));
    }

    #[test]
    fn admin_listener_sharing_the_public_address_is_refused() {
        for yaml in [
            "listen: 0.0.0.0:6000\nadminListen: 0.0.0.0:6000\n",
            "listen: 127.0.0.1:6000\nadminListen: 0.0.0.0:6000\n",
            "listen: 0.0.0.0:5001\n",
        ] {
            let err = load_yaml(yaml).unwrap_err();
            assert!(
                err.to_string().starts_with("adminListen: ")
                    && err.to_string().contains("own port"),
                "{yaml}: {err}"
            );
        }
        for yaml in [
            "listen: 127.0.0.1:6000\nadminListen: 127.0.0.2:6000\n",
            "listen: 127.0.0.1:0\nadminListen: 127.0.0.1:0\n",
            "adminListen: 127.0.0.1:9000\n",
        ] {
            load_yaml(yaml).unwrap();
        }
        let overrides = Overrides {
            listen: Some("127.0.0.1:7000".parse().unwrap()),
            admin_listen: Some("127.0.0.1:7000".parse().unwrap()),
            ..Overrides::default()
        };
        let err = Config::load(None, &overrides).unwrap_err();
        assert!(err.to_string().contains("adminListen"), "{err}");
    }

    #[test]
    fn full_config_round_trips_through_yaml() {
        let text = r#"
listen: 127.0.0.1:5001
adminListen: 127.0.0.1:5002
defaultRegistry: docker.io
storage: { path: /var/lib/cachalot, maxSizeBytes: 1073741824 }
parent: { url: "http://hub:5000" }
registries:
  docker.io:
    credentials: { usernameFile: /s/u, passwordFile: /s/p }
    freshness:
      - { pattern: latest, maxAge: 1m }
      - { pattern: "v*", immutable: true, notFoundMaxAge: 5m }
    budgetReserve: 10
    pin: ["nginx:stable", "library/redis:*", "myteam/*"]
    tokenHosts: [auth.example.com]
    notFoundMaxAge: 1m
    digestNotFoundMaxAge: 0s
  registry.example:5000:
    url: http://registry.example:5000
upstream: { connectTimeout: 2s, retries: 1, revalidateWait: 250ms }
log: { format: json }
"#;
        let c = load_yaml(text).unwrap();
        assert_eq!(c.registries["docker.io"].budget_reserve, 10);
        assert_eq!(c.registries["docker.io"].pin.len(), 3);
        assert_eq!(c.registries["docker.io"].token_hosts, ["auth.example.com"]);
        assert_eq!(
            c.registries["docker.io"].digest_not_found_max_age,
            Some(Duration::ZERO)
        );
        assert_eq!(c.upstream.revalidate_wait, Duration::from_millis(250));
        assert_eq!(
            c.registries["docker.io"].freshness[0].max_age,
            Some(Duration::from_secs(60))
        );
        let again = load_yaml(&serde_yaml::to_string(&c).unwrap()).unwrap();
        assert_eq!(c, again);
    }

    #[test]
    fn tls_auth_and_the_parents_credentials_parse_and_are_checked() {
        let text = r#"
tls: { certFile: /t/tls.crt, keyFile: /t/tls.key, clientCaFile: /t/ca.crt }
auth: { bearerTokenFile: /a/token }
parent:
  url: https://hub:5000
  caFile: /p/ca.crt
  clientCertFile: /p/tls.crt
  clientKeyFile: /p/tls.key
  bearerTokenFile: /p/token
"#;
        let c = load_yaml(text).unwrap();
        let tls = c.tls.as_ref().unwrap();
        assert_eq!(tls.client_ca_file.as_deref(), Some(Path::new("/t/ca.crt")));
        assert_eq!(
            c.auth.as_ref().unwrap().bearer_token_file,
            Path::new("/a/token")
        );
        let parent = c.parent.as_ref().unwrap();
        assert_eq!(
            parent.bearer_token_file.as_deref(),
            Some(Path::new("/p/token"))
        );
        assert_eq!(load_yaml(&serde_yaml::to_string(&c).unwrap()).unwrap(), c);

        let half = "parent: { url: \"https://hub:5000\", clientCertFile: /p/tls.crt }";
        let err = load_yaml(half).unwrap_err().to_string();
        assert!(err.contains("clientCertFile and clientKeyFile"), "{err}");
        let err = load_yaml("tls: { certFile: /t/tls.crt }")
            .unwrap_err()
            .to_string();
        assert!(err.contains("keyFile"), "{err}");
        for section in [
            "tls: { certFile: /c, keyFile: /k }",
            "auth: { bearerTokenFile: /t }",
        ] {
            // With a cluster, the replicas reach each other on the admin port: a fixed one.
            let text = format!(
                "{section}\ncluster: {{ self: \"http://a:5000\" }}\nadminListen: 127.0.0.1:0"
            );
            let err = load_yaml(&text).unwrap_err().to_string();
            assert!(
                err.contains("adminListen") && err.contains("fixed port"),
                "{err}"
            );
            let text = format!("{section}\ncluster: {{ self: \"http://a:5000\" }}");
            let c = load_yaml(&text).unwrap();
            assert!(!c.public_listener_is_open());
        }
        assert!(
            load_yaml("cluster: { self: \"http://a:5000\" }\nadminListen: 127.0.0.1:0")
                .unwrap()
                .public_listener_is_open()
        );
    }
}
