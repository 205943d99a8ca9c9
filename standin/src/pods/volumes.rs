//! Pod volumes on the node: projections of ConfigMaps, Secrets, the downward API and service
//! account tokens (written like the kubelet's atomic writer), `emptyDir`, and `hostPath` mapped
//! into the node root.
//!
//! Layout: `<pod dir>/volumes/<name>` holds `..<stamp>/` (the files), `..data -> ..<stamp>`, and
//! one `<top-level name> -> ..data/<top-level name>` symlink per projected path. An update
//! writes a new `..<stamp>`, swaps `..data` with a rename (atomic), fixes the top-level links and
//! removes the old stamp directory, so a reader (through a bind mount of the volume directory)
//! sees either the old or the new set of files, never a mix. `subPath` mounts of such a volume do
//! not see updates (as with the kubelet).
//!
//! Deviations, documented in the README: `emptyDir` with `medium: Memory` is a plain directory on
//! disk (no size limit); `persistentVolumeClaim` and the other network/cloud volume types are not
//! supported (the pod waits with reason `VolumeNotSupported`); `clusterTrustBundle` and
//! `podCertificate` projections are not supported either.
//!
//! Invariants: a projection is written only when its content changed (compared by digest);
//! until a pod's volumes were all set up once, any failure keeps the pod waiting
//! (`ContainerCreating`, message `FailedMount: …`, retried every sync); after that, a failure
//! (a ConfigMap deleted, a token request refused) keeps the last content and is only logged, as
//! the kubelet does. Tokens are requested with the TokenRequest API, bound to the pod, and
//! refreshed once 80 % of their requested life has passed.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{
    ConfigMap, DownwardAPIVolumeFile, KeyToPath, Pod, Secret, ServiceAccount, Volume,
};
use kube::api::PostParams;
use kube::{Api, Client};
use sha2::{Digest, Sha256};
use tracing::{debug, warn};

use super::env::{field_value, SourceLookup};

/// Default file mode of projected files (0644).
pub const DEFAULT_MODE: u32 = 0o644;
/// Default token life when a projection sets none.
pub const DEFAULT_TOKEN_SECONDS: i64 = 3600;

/// One projected file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileData {
    /// Its content.
    pub data: Vec<u8>,
    /// Its permission bits.
    pub mode: u32,
}

/// The files of a projected volume, by relative path.
pub type Payload = BTreeMap<String, FileData>;

/// Why a projection cannot be computed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProjectVolumeError {
    /// A non-optional ConfigMap or Secret is missing.
    #[error("{kind} \"{name}\" not found")]
    SourceMissing {
        /// `configmap` or `secret`.
        kind: &'static str,
        /// Its name.
        name: String,
    },
    /// An `items` key is missing from a non-optional source.
    #[error("{kind} {name} references non-existent key {key}")]
    KeyMissing {
        /// `configmap` or `secret`.
        kind: &'static str,
        /// Its name.
        name: String,
        /// The key.
        key: String,
    },
    /// An item path is absolute, empty or climbs out with `..`.
    #[error("invalid projected path {0:?}")]
    InvalidPath(String),
    /// A downward API item that cannot be rendered.
    #[error("downward API {path}: {message}")]
    Downward {
        /// The item path.
        path: String,
        /// Why.
        message: String,
    },
    /// The token of a `serviceAccountToken` source is not there yet.
    #[error("service account token for {path} not issued")]
    TokenMissing {
        /// The item path.
        path: String,
    },
}

fn check_path(path: &str) -> Result<(), ProjectVolumeError> {
    let valid = !path.is_empty()
        && Path::new(path)
            .components()
            .all(|c| matches!(c, Component::Normal(_)))
        && !path.starts_with("..");
    if valid {
        Ok(())
    } else {
        Err(ProjectVolumeError::InvalidPath(path.to_owned()))
    }
}

fn mode_bits(mode: Option<i32>, default_mode: u32) -> u32 {
    mode.and_then(|m| u32::try_from(m).ok())
        .map_or(default_mode, |m| m & 0o7777)
}

/// Projects the keys of a ConfigMap or Secret (`data` is `None` when the source is missing).
pub fn project_keys(
    kind: &'static str,
    name: &str,
    data: Option<BTreeMap<String, Vec<u8>>>,
    items: Option<&[KeyToPath]>,
    default_mode: u32,
    optional: bool,
) -> Result<Payload, ProjectVolumeError> {
    let Some(data) = data else {
        return if optional {
            Ok(Payload::new())
        } else {
            Err(ProjectVolumeError::SourceMissing {
                kind,
                name: name.to_owned(),
            })
        };
    };
    let mut payload = Payload::new();
    match items {
        None => {
            for (key, value) in data {
                check_path(&key)?;
                payload.insert(
                    key,
                    FileData {
                        data: value,
                        mode: default_mode,
                    },
                );
            }
        }
        Some(items) => {
            for item in items {
                check_path(&item.path)?;
                match data.get(&item.key) {
                    Some(value) => {
                        payload.insert(
                            item.path.clone(),
                            FileData {
                                data: value.clone(),
                                mode: mode_bits(item.mode, default_mode),
                            },
                        );
                    }
                    None if optional => {}
                    None => {
                        return Err(ProjectVolumeError::KeyMissing {
                            kind,
                            name: name.to_owned(),
                            key: item.key.clone(),
                        })
                    }
                }
            }
        }
    }
    Ok(payload)
}

/// The data of a ConfigMap as bytes (`data` and `binaryData`).
pub fn config_map_bytes(cm: &ConfigMap) -> BTreeMap<String, Vec<u8>> {
    let mut data: BTreeMap<String, Vec<u8>> = cm
        .data
        .iter()
        .flatten()
        .map(|(k, v)| (k.clone(), v.clone().into_bytes()))
        .collect();
    for (key, value) in cm.binary_data.iter().flatten() {
        data.insert(key.clone(), value.0.clone());
    }
    data
}

/// The data of a Secret as bytes.
pub fn secret_bytes(secret: &Secret) -> BTreeMap<String, Vec<u8>> {
    let mut data: BTreeMap<String, Vec<u8>> = secret
        .data
        .iter()
        .flatten()
        .map(|(k, v)| (k.clone(), v.0.clone()))
        .collect();
    for (key, value) in secret.string_data.iter().flatten() {
        data.insert(key.clone(), value.clone().into_bytes());
    }
    data
}

/// Projects downward API items of `pod`.
pub fn project_downward(
    items: &[DownwardAPIVolumeFile],
    pod: &Pod,
    pod_ip: Option<&str>,
    host_ip: &str,
    default_mode: u32,
) -> Result<Payload, ProjectVolumeError> {
    let mut payload = Payload::new();
    for item in items {
        check_path(&item.path)?;
        let Some(field) = &item.field_ref else {
            return Err(ProjectVolumeError::Downward {
                path: item.path.clone(),
                message: "only fieldRef is supported by cachalot-standin".to_owned(),
            });
        };
        let value = field_value(&field.field_path, pod, pod_ip, host_ip).map_err(|e| {
            ProjectVolumeError::Downward {
                path: item.path.clone(),
                message: e.to_string(),
            }
        })?;
        payload.insert(
            item.path.clone(),
            FileData {
                data: value.into_bytes(),
                mode: mode_bits(item.mode, default_mode),
            },
        );
    }
    Ok(payload)
}

/// A `serviceAccountToken` source of a projected volume that needs a token.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TokenSource {
    /// The volume.
    pub volume: String,
    /// Index of the source in the volume's `sources`.
    pub index: usize,
    /// Audience (`None`: the API server's default).
    pub audience: Option<String>,
    /// Requested life in seconds.
    pub expiration_seconds: i64,
}

/// The token sources of a pod's volumes.
pub fn token_sources(pod: &Pod) -> Vec<TokenSource> {
    let mut sources = Vec::new();
    for volume in pod.spec.iter().flat_map(|s| s.volumes.iter().flatten()) {
        let Some(projected) = &volume.projected else {
            continue;
        };
        for (index, source) in projected.sources.iter().flatten().enumerate() {
            if let Some(token) = &source.service_account_token {
                sources.push(TokenSource {
                    volume: volume.name.clone(),
                    index,
                    audience: token.audience.clone().filter(|a| !a.is_empty()),
                    expiration_seconds: token.expiration_seconds.unwrap_or(DEFAULT_TOKEN_SECONDS),
                });
            }
        }
    }
    sources
}

/// How a volume is provided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VolumeKind {
    /// A fresh directory (mode 0777) in the pod directory.
    EmptyDir,
    /// A path in the node root.
    HostPath {
        /// The path the pod names (absolute on the "node").
        path: String,
        /// `type` (`""` when unset).
        type_: String,
    },
    /// Files projected from API objects (configMap, secret, downwardAPI, projected).
    Projection,
    /// Not supported by the stand-in; the pod waits with this reason.
    Unsupported {
        /// Waiting reason.
        reason: &'static str,
        /// The volume's type.
        kind: String,
    },
}

/// How `volume` is provided.
pub fn classify(volume: &Volume) -> VolumeKind {
    if volume.empty_dir.is_some() {
        VolumeKind::EmptyDir
    } else if let Some(host) = &volume.host_path {
        VolumeKind::HostPath {
            path: host.path.clone(),
            type_: host.type_.clone().unwrap_or_default(),
        }
    } else if volume.config_map.is_some()
        || volume.secret.is_some()
        || volume.downward_api.is_some()
        || volume.projected.is_some()
    {
        VolumeKind::Projection
    } else {
        let value = serde_json::to_value(volume).unwrap_or_default();
        let kind = value
            .as_object()
            .and_then(|o| o.keys().find(|k| k.as_str() != "name").cloned())
            .unwrap_or_else(|| "unknown".to_owned());
        VolumeKind::Unsupported {
            reason: "VolumeNotSupported",
            kind,
        }
    }
}

/// The payload of a projection-kind `volume`; `tokens` holds issued tokens by source index.
pub fn project(
    volume: &Volume,
    pod: &Pod,
    sources: &dyn SourceLookup,
    tokens: &BTreeMap<usize, String>,
    pod_ip: Option<&str>,
    host_ip: &str,
) -> Result<Payload, ProjectVolumeError> {
    if let Some(cm) = &volume.config_map {
        let default_mode = mode_bits(cm.default_mode, DEFAULT_MODE);
        return project_keys(
            "configmap",
            &cm.name,
            sources.config_map(&cm.name).map(|c| config_map_bytes(&c)),
            cm.items.as_deref(),
            default_mode,
            cm.optional.unwrap_or(false),
        );
    }
    if let Some(secret) = &volume.secret {
        let name = secret.secret_name.clone().unwrap_or_default();
        let default_mode = mode_bits(secret.default_mode, DEFAULT_MODE);
        return project_keys(
            "secret",
            &name,
            sources.secret(&name).map(|s| secret_bytes(&s)),
            secret.items.as_deref(),
            default_mode,
            secret.optional.unwrap_or(false),
        );
    }
    if let Some(downward) = &volume.downward_api {
        let default_mode = mode_bits(downward.default_mode, DEFAULT_MODE);
        return project_downward(
            downward.items.as_deref().unwrap_or_default(),
            pod,
            pod_ip,
            host_ip,
            default_mode,
        );
    }
    let mut payload = Payload::new();
    if let Some(projected) = &volume.projected {
        let default_mode = mode_bits(projected.default_mode, DEFAULT_MODE);
        for (index, source) in projected.sources.iter().flatten().enumerate() {
            let part = if let Some(cm) = &source.config_map {
                project_keys(
                    "configmap",
                    &cm.name,
                    sources.config_map(&cm.name).map(|c| config_map_bytes(&c)),
                    cm.items.as_deref(),
                    default_mode,
                    cm.optional.unwrap_or(false),
                )?
            } else if let Some(secret) = &source.secret {
                project_keys(
                    "secret",
                    &secret.name,
                    sources.secret(&secret.name).map(|s| secret_bytes(&s)),
                    secret.items.as_deref(),
                    default_mode,
                    secret.optional.unwrap_or(false),
                )?
            } else if let Some(downward) = &source.downward_api {
                project_downward(
                    downward.items.as_deref().unwrap_or_default(),
                    pod,
                    pod_ip,
                    host_ip,
                    default_mode,
                )?
            } else if let Some(token) = &source.service_account_token {
                check_path(&token.path)?;
                let value = tokens
                    .get(&index)
                    .ok_or_else(|| ProjectVolumeError::TokenMissing {
                        path: token.path.clone(),
                    })?;
                Payload::from([(
                    token.path.clone(),
                    FileData {
                        data: value.clone().into_bytes(),
                        mode: default_mode,
                    },
                )])
            } else {
                Payload::new()
            };
            payload.extend(part);
        }
    }
    Ok(payload)
}

/// Digest of a payload (paths, modes and contents).
pub fn payload_digest(payload: &Payload) -> [u8; 32] {
    let mut hasher = Sha256::new();
    for (path, file) in payload {
        hasher.update((path.len() as u64).to_le_bytes());
        hasher.update(path.as_bytes());
        hasher.update(file.mode.to_le_bytes());
        hasher.update((file.data.len() as u64).to_le_bytes());
        hasher.update(&file.data);
    }
    hasher.finalize().into()
}

/// Where hostPath `path` lives: inside `node_root`.
pub fn host_path_location(node_root: &Path, path: &str) -> PathBuf {
    let relative: PathBuf = Path::new(path)
        .components()
        .filter(|c| matches!(c, Component::Normal(_)))
        .collect();
    node_root.join(relative)
}

/// The top-level names of a payload (first path components).
pub fn top_level_names(payload: &Payload) -> BTreeSet<String> {
    payload
        .keys()
        .filter_map(|p| p.split('/').next().map(str::to_owned))
        .collect()
}

/// Why a volume could not be set up on disk.
#[derive(Debug, thiserror::Error)]
pub enum SetUpVolumeError {
    /// A file operation failed.
    #[error("{action} {path}: {source}")]
    Io {
        /// What was done.
        action: &'static str,
        /// On what.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A hostPath of type `Directory`, `File`, … is missing or of another type.
    #[error("hostPath type check failed: {path} is not a {expected}")]
    HostPathType {
        /// The mapped path.
        path: PathBuf,
        /// The expected type.
        expected: String,
    },
    /// A projection failed.
    #[error(transparent)]
    Project(#[from] ProjectVolumeError),
    /// A volume type the stand-in does not support.
    #[error("{kind} volumes are not supported by cachalot-standin")]
    Unsupported {
        /// The volume's type.
        kind: String,
    },
    /// A TokenRequest failed.
    #[error("request a token for service account {account}: {source}")]
    RequestToken {
        /// The service account.
        account: String,
        /// Why.
        source: kube::Error,
    },
}

fn io_error(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> SetUpVolumeError {
    let path = path.to_path_buf();
    move |source| SetUpVolumeError::Io {
        action,
        path,
        source,
    }
}

fn set_mode(path: &Path, mode: u32) -> Result<(), SetUpVolumeError> {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(io_error("chmod", path))
}

fn chgrp(path: &Path, gid: Option<u32>) -> Result<(), SetUpVolumeError> {
    match gid {
        Some(gid) => {
            std::os::unix::fs::lchown(path, None, Some(gid)).map_err(io_error("chgrp", path))
        }
        None => Ok(()),
    }
}

fn unique_stamp() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    format!("..{nanos}")
}

/// Writes `payload` into `dir` atomically (see the module doc); `fs_group` gets group ownership
/// and group read access, as the kubelet gives it.
pub fn write_payload(
    dir: &Path,
    payload: &Payload,
    fs_group: Option<u32>,
) -> Result<(), SetUpVolumeError> {
    std::fs::create_dir_all(dir).map_err(io_error("create", dir))?;
    let dir_mode = if fs_group.is_some() { 0o2755 } else { 0o755 };
    set_mode(dir, dir_mode)?;
    chgrp(dir, fs_group)?;
    let stamp = unique_stamp();
    let stamp_dir = dir.join(&stamp);
    std::fs::create_dir(&stamp_dir).map_err(io_error("create", &stamp_dir))?;
    set_mode(&stamp_dir, dir_mode)?;
    chgrp(&stamp_dir, fs_group)?;
    for (relative, file) in payload {
        let path = stamp_dir.join(relative);
        if let Some(parent) = path.parent() {
            if parent != stamp_dir {
                std::fs::create_dir_all(parent).map_err(io_error("create", parent))?;
                set_mode(parent, dir_mode)?;
                chgrp(parent, fs_group)?;
            }
        }
        std::fs::write(&path, &file.data).map_err(io_error("write", &path))?;
        let mode = if fs_group.is_some() {
            file.mode | 0o440
        } else {
            file.mode
        };
        set_mode(&path, mode)?;
        chgrp(&path, fs_group)?;
    }
    let data_link = dir.join("..data");
    let old = std::fs::read_link(&data_link).ok();
    let tmp_link = dir.join("..data_tmp");
    let _ = std::fs::remove_file(&tmp_link);
    symlink(&stamp, &tmp_link).map_err(io_error("link", &tmp_link))?;
    std::fs::rename(&tmp_link, &data_link).map_err(io_error("rename", &data_link))?;
    let names = top_level_names(payload);
    for name in &names {
        let link = dir.join(name);
        if std::fs::symlink_metadata(&link).is_err() {
            symlink(Path::new("..data").join(name), &link).map_err(io_error("link", &link))?;
        }
    }
    let entries = std::fs::read_dir(dir).map_err(io_error("list", dir))?;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with("..") {
            if name != stamp && name != "..data" && name.len() > 2 {
                let _ = std::fs::remove_dir_all(entry.path());
            }
            continue;
        }
        if !names.contains(&name) {
            let _ = std::fs::remove_file(entry.path());
        }
    }
    if let Some(old) = old {
        if old != Path::new(&stamp) {
            let _ = std::fs::remove_dir_all(dir.join(old));
        }
    }
    Ok(())
}

/// Creates an emptyDir: mode 0777 (setgid and the group when `fs_group`).
pub fn ensure_empty_dir(dir: &Path, fs_group: Option<u32>) -> Result<(), SetUpVolumeError> {
    std::fs::create_dir_all(dir).map_err(io_error("create", dir))?;
    set_mode(dir, if fs_group.is_some() { 0o2777 } else { 0o777 })?;
    chgrp(dir, fs_group)
}

/// Checks or creates a hostPath of `type_` at `path` (already mapped into the node root).
pub fn ensure_host_path(path: &Path, type_: &str) -> Result<(), SetUpVolumeError> {
    use std::os::unix::fs::FileTypeExt;
    let meta = std::fs::metadata(path).ok();
    let mismatch = |expected: &str| SetUpVolumeError::HostPathType {
        path: path.to_path_buf(),
        expected: expected.to_owned(),
    };
    match type_ {
        // The CRI plugin of containerd creates a missing bind source as a directory.
        "" | "DirectoryOrCreate" => {
            if meta.is_none() {
                std::fs::create_dir_all(path).map_err(io_error("create", path))?;
                set_mode(path, 0o755)?;
            } else if type_ == "DirectoryOrCreate" && !meta.is_some_and(|m| m.is_dir()) {
                return Err(mismatch("directory"));
            }
            Ok(())
        }
        "Directory" => match meta {
            Some(m) if m.is_dir() => Ok(()),
            _ => Err(mismatch("directory")),
        },
        "FileOrCreate" => match meta {
            Some(m) if m.is_file() => Ok(()),
            Some(_) => Err(mismatch("file")),
            None => {
                if let Some(parent) = path.parent() {
                    std::fs::create_dir_all(parent).map_err(io_error("create", parent))?;
                }
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(io_error("create", path))?;
                set_mode(path, 0o644)
            }
        },
        "File" => match meta {
            Some(m) if m.is_file() => Ok(()),
            _ => Err(mismatch("file")),
        },
        "Socket" => match meta {
            Some(m) if m.file_type().is_socket() => Ok(()),
            _ => Err(mismatch("socket")),
        },
        "CharDevice" => match meta {
            Some(m) if m.file_type().is_char_device() => Ok(()),
            _ => Err(mismatch("character device")),
        },
        "BlockDevice" => match meta {
            Some(m) if m.file_type().is_block_device() => Ok(()),
            _ => Err(mismatch("block device")),
        },
        other => Err(mismatch(other)),
    }
}

/// An issued token and when to refresh it.
#[derive(Debug, Clone)]
struct IssuedToken {
    token: String,
    refresh_at: Instant,
}

/// When a token requested for `expiration_seconds` at `issued` is due for refresh (80 %).
pub fn refresh_time(issued: Instant, expiration_seconds: i64) -> Instant {
    let life = u64::try_from(expiration_seconds).unwrap_or(0);
    issued + Duration::from_millis(life.saturating_mul(800))
}

/// What a pod's volumes need from outside.
pub struct VolumeInputs<'a> {
    /// API client (TokenRequests).
    pub client: &'a Client,
    /// The pod.
    pub pod: &'a Pod,
    /// ConfigMaps and Secrets of the pod's namespace.
    pub sources: &'a (dyn SourceLookup + Sync),
    /// The node root hostPaths map into.
    pub node_root: &'a Path,
    /// The pod IP, once known.
    pub pod_ip: Option<&'a str>,
    /// The node IP.
    pub host_ip: &'a str,
}

/// Why a pod's volumes are not ready.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumesNotReady {
    /// Waiting reason of the containers.
    pub reason: &'static str,
    /// Message.
    pub message: String,
}

/// The volumes of one pod: where they are and what was written.
#[derive(Debug)]
pub struct PodVolumes {
    root: PathBuf,
    written: HashMap<String, [u8; 32]>,
    tokens: HashMap<(String, usize), IssuedToken>,
    ready: bool,
    locations: BTreeMap<String, PathBuf>,
}

impl PodVolumes {
    /// Volumes under `root` (`<pod dir>/volumes`).
    pub fn new(root: PathBuf) -> Self {
        Self {
            root,
            written: HashMap::new(),
            tokens: HashMap::new(),
            ready: false,
            locations: BTreeMap::new(),
        }
    }

    /// Where each volume is on the host, once all were set up.
    pub fn locations(&self) -> Option<&BTreeMap<String, PathBuf>> {
        self.ready.then_some(&self.locations)
    }

    async fn refresh_tokens(&mut self, inputs: &VolumeInputs<'_>) -> Result<(), SetUpVolumeError> {
        let pod = inputs.pod;
        let namespace = pod.metadata.namespace.clone().unwrap_or_default();
        let account = pod
            .spec
            .as_ref()
            .and_then(|s| s.service_account_name.clone())
            .unwrap_or_else(|| "default".to_owned());
        let api: Api<ServiceAccount> = Api::namespaced(inputs.client.clone(), &namespace);
        let now = Instant::now();
        for source in token_sources(pod) {
            let key = (source.volume.clone(), source.index);
            if self.tokens.get(&key).is_some_and(|t| t.refresh_at > now) {
                continue;
            }
            let request = TokenRequest {
                spec: Some(TokenRequestSpec {
                    audiences: source.audience.clone().map(|a| vec![a]),
                    expiration_seconds: Some(source.expiration_seconds),
                    bound_object_ref: Some(BoundObjectReference {
                        api_version: Some("v1".to_owned()),
                        kind: Some("Pod".to_owned()),
                        name: pod.metadata.name.clone(),
                        uid: pod.metadata.uid.clone(),
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            };
            let issued = api
                .create_token_request(&account, &PostParams::default(), &request)
                .await
                .map_err(|source| SetUpVolumeError::RequestToken {
                    account: format!("{namespace}/{account}"),
                    source,
                })?;
            let token = issued.status.and_then(|s| s.token).unwrap_or_default();
            debug!(volume = %source.volume, "service account token issued");
            self.tokens.insert(
                key,
                IssuedToken {
                    token,
                    refresh_at: refresh_time(now, source.expiration_seconds),
                },
            );
        }
        Ok(())
    }

    async fn sync_all(
        &mut self,
        inputs: &VolumeInputs<'_>,
    ) -> Result<(), (String, SetUpVolumeError, &'static str)> {
        let pod = inputs.pod;
        let fs_group = pod
            .spec
            .as_ref()
            .and_then(|s| s.security_context.as_ref())
            .and_then(|s| s.fs_group)
            .and_then(|g| u32::try_from(g).ok());
        if let Err(error) = self.refresh_tokens(inputs).await {
            return Err((
                "(service account token)".to_owned(),
                error,
                "ContainerCreating",
            ));
        }
        for volume in pod.spec.iter().flat_map(|s| s.volumes.iter().flatten()) {
            let dir = self.root.join(&volume.name);
            let fail = |error: SetUpVolumeError| (volume.name.clone(), error, "ContainerCreating");
            match classify(volume) {
                VolumeKind::EmptyDir => {
                    if !self.locations.contains_key(&volume.name) {
                        ensure_empty_dir(&dir, fs_group).map_err(fail)?;
                        self.locations.insert(volume.name.clone(), dir);
                    }
                }
                VolumeKind::HostPath { path, type_ } => {
                    if !self.locations.contains_key(&volume.name) {
                        let mapped = host_path_location(inputs.node_root, &path);
                        ensure_host_path(&mapped, &type_).map_err(fail)?;
                        self.locations.insert(volume.name.clone(), mapped);
                    }
                }
                VolumeKind::Projection => {
                    let tokens: BTreeMap<usize, String> = self
                        .tokens
                        .iter()
                        .filter(|((name, _), _)| name == &volume.name)
                        .map(|((_, index), issued)| (*index, issued.token.clone()))
                        .collect();
                    let payload = project(
                        volume,
                        pod,
                        inputs.sources,
                        &tokens,
                        inputs.pod_ip,
                        inputs.host_ip,
                    )
                    .map_err(|e| fail(e.into()))?;
                    let digest = payload_digest(&payload);
                    if self.written.get(&volume.name) != Some(&digest) {
                        write_payload(&dir, &payload, fs_group).map_err(fail)?;
                        self.written.insert(volume.name.clone(), digest);
                        debug!(volume = %volume.name, "volume content written");
                    }
                    self.locations.insert(volume.name.clone(), dir);
                }
                VolumeKind::Unsupported { reason, kind } => {
                    return Err((
                        volume.name.clone(),
                        SetUpVolumeError::Unsupported { kind },
                        reason,
                    ));
                }
            }
        }
        Ok(())
    }

    /// Sets up or refreshes every volume of the pod. Before the first complete set-up an error
    /// is returned (the pod waits); afterwards errors are logged and the last content stays.
    pub async fn sync(&mut self, inputs: &VolumeInputs<'_>) -> Result<(), VolumesNotReady> {
        match self.sync_all(inputs).await {
            Ok(()) => {
                self.ready = true;
                Ok(())
            }
            Err((volume, error, reason)) if !self.ready => Err(VolumesNotReady {
                reason,
                message: match reason {
                    "ContainerCreating" => format!(
                        "FailedMount: MountVolume.SetUp failed for volume \"{volume}\": {error}"
                    ),
                    _ => format!("volume \"{volume}\": {error}"),
                },
            }),
            Err((volume, error, _)) => {
                warn!(%volume, %error, "volume refresh failed; keeping the last content");
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use k8s_openapi::api::core::v1::{
        ConfigMapVolumeSource, ObjectFieldSelector, PersistentVolumeClaimVolumeSource, PodSpec,
    };
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
    use std::os::unix::fs::MetadataExt;

    use super::*;

    fn data(pairs: &[(&str, &str)]) -> Option<BTreeMap<String, Vec<u8>>> {
        Some(
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), v.as_bytes().to_vec()))
                .collect(),
        )
    }

    #[test]
    fn all_keys_are_projected_with_the_default_mode() {
        let payload = project_keys(
            "configmap",
            "c",
            data(&[("a", "1"), ("b", "2")]),
            None,
            0o600,
            false,
        )
        .unwrap();
        assert_eq!(payload.len(), 2);
        assert_eq!(
            payload["a"],
            FileData {
                data: b"1".to_vec(),
                mode: 0o600
            }
        );
    }

    #[test]
    fn items_choose_keys_paths_and_modes() {
        let items = [KeyToPath {
            key: "a".into(),
            path: "dir/file.txt".into(),
            mode: Some(0o400),
            user: None,
        }];
        let payload = project_keys(
            "configmap",
            "c",
            data(&[("a", "1"), ("b", "2")]),
            Some(&items),
            0o644,
            false,
        )
        .unwrap();
        assert_eq!(payload.keys().collect::<Vec<_>>(), ["dir/file.txt"]);
        assert_eq!(payload["dir/file.txt"].mode, 0o400);
        assert_eq!(
            top_level_names(&payload),
            BTreeSet::from(["dir".to_owned()])
        );
    }

    #[test]
    fn missing_sources_and_keys_fail_unless_optional() {
        assert_eq!(
            project_keys("configmap", "c", None, None, 0o644, false),
            Err(ProjectVolumeError::SourceMissing {
                kind: "configmap",
                name: "c".into()
            })
        );
        assert_eq!(
            project_keys("secret", "s", None, None, 0o644, true),
            Ok(Payload::new())
        );
        let items = [KeyToPath {
            key: "x".into(),
            path: "x".into(),
            mode: None,
            user: None,
        }];
        assert!(matches!(
            project_keys("configmap", "c", data(&[]), Some(&items), 0o644, false),
            Err(ProjectVolumeError::KeyMissing { .. })
        ));
        assert_eq!(
            project_keys("configmap", "c", data(&[]), Some(&items), 0o644, true),
            Ok(Payload::new())
        );
    }

    #[test]
    fn paths_that_climb_out_are_rejected() {
        for bad in ["../x", "/abs", "a/../../b", "..data", ""] {
            let items = [KeyToPath {
                key: "a".into(),
                path: bad.into(),
                mode: None,
                user: None,
            }];
            assert!(
                project_keys(
                    "configmap",
                    "c",
                    data(&[("a", "1")]),
                    Some(&items),
                    0o644,
                    false
                )
                .is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn downward_items_render_pod_fields() {
        let pod = Pod {
            metadata: ObjectMeta {
                name: Some("p".into()),
                namespace: Some("ns".into()),
                labels: Some(BTreeMap::from([
                    ("b".to_owned(), "2".to_owned()),
                    ("a".to_owned(), "1".to_owned()),
                ])),
                ..Default::default()
            },
            ..Default::default()
        };
        let item = |path: &str, field: &str| DownwardAPIVolumeFile {
            path: path.into(),
            field_ref: Some(ObjectFieldSelector {
                field_path: field.into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let payload = project_downward(
            &[
                item("namespace", "metadata.namespace"),
                item("labels", "metadata.labels"),
            ],
            &pod,
            None,
            "10.0.0.1",
            0o644,
        )
        .unwrap();
        assert_eq!(payload["namespace"].data, b"ns");
        assert_eq!(payload["labels"].data, b"a=\"1\"\nb=\"2\"");
    }

    #[test]
    fn host_paths_map_into_the_node_root_and_volume_kinds_are_classified() {
        assert_eq!(
            host_path_location(Path::new("/nodes/n1"), "/etc/containerd/certs.d"),
            PathBuf::from("/nodes/n1/etc/containerd/certs.d")
        );
        assert_eq!(
            host_path_location(Path::new("/nodes/n1"), "/../etc"),
            PathBuf::from("/nodes/n1/etc")
        );
        let pvc = Volume {
            name: "data".into(),
            persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                claim_name: "c".into(),
                read_only: None,
            }),
            ..Default::default()
        };
        assert_eq!(
            classify(&pvc),
            VolumeKind::Unsupported {
                reason: "VolumeNotSupported",
                kind: "persistentVolumeClaim".into()
            }
        );
        let cm = Volume {
            name: "cfg".into(),
            config_map: Some(ConfigMapVolumeSource {
                name: "c".into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        assert_eq!(classify(&cm), VolumeKind::Projection);
    }

    #[test]
    fn token_refresh_is_due_at_eighty_percent_of_the_life() {
        let now = Instant::now();
        assert_eq!(refresh_time(now, 3600), now + Duration::from_secs(2880));
        assert_eq!(refresh_time(now, -5), now);
    }

    fn read(dir: &Path, name: &str) -> String {
        std::fs::read_to_string(dir.join(name)).unwrap()
    }

    #[test]
    fn payload_updates_swap_the_data_link_and_prune_old_files() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("vol");
        let first = Payload::from([
            (
                "a".to_owned(),
                FileData {
                    data: b"1".to_vec(),
                    mode: 0o644,
                },
            ),
            (
                "sub/b".to_owned(),
                FileData {
                    data: b"2".to_vec(),
                    mode: 0o600,
                },
            ),
        ]);
        write_payload(&dir, &first, None).unwrap();
        assert_eq!(read(&dir, "a"), "1");
        assert_eq!(read(&dir, "sub/b"), "2");
        assert_eq!(
            std::fs::read_link(dir.join("a")).unwrap(),
            PathBuf::from("..data/a")
        );
        let first_stamp = std::fs::read_link(dir.join("..data")).unwrap();
        assert_eq!(
            std::fs::metadata(dir.join("sub/b")).unwrap().mode() & 0o777,
            0o600
        );

        let second = Payload::from([(
            "a".to_owned(),
            FileData {
                data: b"one".to_vec(),
                mode: 0o644,
            },
        )]);
        write_payload(&dir, &second, None).unwrap();
        assert_eq!(read(&dir, "a"), "one");
        assert!(
            std::fs::symlink_metadata(dir.join("sub")).is_err(),
            "stale link pruned"
        );
        assert!(!dir.join(&first_stamp).exists(), "old stamp removed");
        let entries: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(entries.len(), 3, "{entries:?}");
    }

    #[test]
    fn empty_dirs_are_world_writable_and_host_path_types_are_checked() {
        let tmp = tempfile::tempdir().unwrap();
        let empty = tmp.path().join("e");
        ensure_empty_dir(&empty, None).unwrap();
        assert_eq!(std::fs::metadata(&empty).unwrap().mode() & 0o7777, 0o777);

        let missing = tmp.path().join("missing");
        assert!(matches!(
            ensure_host_path(&missing, "Directory"),
            Err(SetUpVolumeError::HostPathType { .. })
        ));
        assert!(ensure_host_path(&missing, "File").is_err());
        ensure_host_path(&missing, "DirectoryOrCreate").unwrap();
        assert!(missing.is_dir());
        ensure_host_path(&missing, "Directory").unwrap();
        assert!(ensure_host_path(&missing, "File").is_err());
        let file = tmp.path().join("d/f");
        ensure_host_path(&file, "FileOrCreate").unwrap();
        assert!(file.is_file());
        ensure_host_path(&file, "File").unwrap();
        let plain = tmp.path().join("plain");
        ensure_host_path(&plain, "").unwrap();
        assert!(plain.is_dir());
    }

    #[test]
    fn token_sources_are_found_in_projected_volumes() {
        let pod = Pod {
            spec: Some(PodSpec {
                volumes: Some(vec![Volume {
                    name: "kube-api-access-x".into(),
                    projected: Some(k8s_openapi::api::core::v1::ProjectedVolumeSource {
                        sources: Some(vec![k8s_openapi::api::core::v1::VolumeProjection {
                            service_account_token: Some(
                                k8s_openapi::api::core::v1::ServiceAccountTokenProjection {
                                    audience: None,
                                    expiration_seconds: Some(3607),
                                    path: "token".into(),
                                    user: None,
                                },
                            ),
                            ..Default::default()
                        }]),
                        default_mode: Some(0o644),
                        default_user: None,
                    }),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            ..Default::default()
        };
        assert_eq!(
            token_sources(&pod),
            [TokenSource {
                volume: "kube-api-access-x".into(),
                index: 0,
                audience: None,
                expiration_seconds: 3607
            }]
        );
    }
}
