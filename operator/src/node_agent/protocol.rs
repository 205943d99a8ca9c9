//! Wire protocol between the operator and the node agent.
//!
//! The operator writes a [`DesiredState`] as JSON into a ConfigMap owned by the RegistryMirror; the
//! DaemonSet mounts it as a file (`--desired-file`). The agent has no Kubernetes API access: it
//! reports back only through `GET /status` on its listen port, answering an [`AgentStatus`], which
//! the operator fetches from every agent pod (hostNetwork, so pod IP = node IP).
//!
//! Invariants:
//! - Both sides use these exact types, so the shapes cannot drift; JSON is camelCase.
//! - Unknown fields are ignored (not denied) so that an older agent keeps working while a newer
//!   operator rolls out; unknown reasons/states deserialise to `Unknown` for the same reason.
//! - Durations are Go-style strings (`"500ms"`, `"3s"`, `"1m30s"`), the same syntax containerd uses
//!   for `dial_timeout`; the agent validates them (see [`super::duration`]).

use serde::{Deserialize, Serialize};

/// What one RegistryMirror wants on every node it selects.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DesiredState {
    /// The owning mirror as `"<namespace>/<name>"`; written into every managed file's marker.
    pub mirror: String,
    /// Content hash of this desired state, chosen by the operator; echoed back in
    /// [`AgentStatus::generation`] once applied, so the operator knows a node caught up.
    pub generation: String,
    /// The mirror is being deleted: the agent removes every file it manages for it and reports
    /// an empty [`AgentStatus::managed_files`] when done.
    #[serde(default)]
    pub removing: bool,
    /// Which container runtime configuration to write.
    #[serde(default)]
    pub runtime: Runtime,
    /// One entry per upstream registry routed through the mirror.
    #[serde(default)]
    pub registries: Vec<DesiredRegistry>,
    /// How long a written endpoint may stay unanswering before the agent takes it out again.
    #[serde(default = "default_unreachable_after")]
    pub unreachable_after: String,
    /// When a registry's `hosts.toml` already exists without our marker (an administrator's own),
    /// merge our host entries ahead of the existing ones instead of leaving the node unconfigured.
    #[serde(default)]
    pub merge_with_admin_file: bool,
    /// A PEM CA bundle in the agent's own file system (the mirror's `ca.crt`, a mounted Secret
    /// key) that the mirror's certificate chains to: the agent installs it beside each
    /// `hosts.toml` it writes ([`super::render::CA_FILE_NAME`]) and names it as the endpoints'
    /// `ca`, and its probes trust it. Absent or empty file: nothing is installed (the nodes'
    /// system roots must trust the mirror).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mirror_ca_file: Option<String>,
    /// A client certificate and key in the agent's own file system (the mounted
    /// `spec.tls.clientAuth.nodeClientCertSecret`) for a mirror that requires mTLS: the agent
    /// installs both beside each `hosts.toml` it writes ([`super::render::CLIENT_CERT_FILE_NAME`],
    /// [`super::render::CLIENT_KEY_FILE_NAME`], the key readable by root only), names them as the
    /// endpoints' `client`, and its probes present them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mirror_client_cert: Option<ClientCertFiles>,
}

/// A certificate and its private key, as two PEM files.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClientCertFiles {
    /// The certificate (chain), PEM.
    pub cert_file: String,
    /// Its private key, PEM.
    pub key_file: String,
}

fn default_unreachable_after() -> String {
    "30s".to_string()
}

/// The node's container runtime family.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Runtime {
    /// containerd: `certs.d/<registry>/hosts.toml`.
    #[default]
    Containerd,
    /// CRI-O (and podman): a `registries.conf.d` drop-in.
    Crio,
    /// Docker Engine: `registry-mirrors` in `daemon.json` (Docker Hub only).
    Docker,
}

/// One upstream registry and the mirror endpoints that serve it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DesiredRegistry {
    /// The registry host as image references name it: `"docker.io"`, `"ghcr.io"`,
    /// `"registry.local:5000"`, or `"_default"` (containerd's catch-all directory).
    pub registry: String,
    /// The upstream URL containerd falls back to (`server` in hosts.toml). `None` means the
    /// registry's own default (`https://registry-1.docker.io` for docker.io, `https://<registry>`
    /// otherwise). Ignored when `fallback` is `Never`.
    #[serde(default)]
    pub server: Option<String>,
    /// Mirror endpoints in order of preference, e.g. `"http://10.96.0.12:5000"`.
    #[serde(default)]
    pub endpoints: Vec<String>,
    /// What containerd does when every endpoint fails.
    #[serde(default)]
    pub fallback: Fallback,
    /// containerd `dial_timeout` per endpoint (short, so a dead mirror costs little).
    #[serde(default = "default_dial_timeout")]
    pub dial_timeout: String,
    /// Skip TLS verification of the endpoints (`skip_verify`).
    #[serde(default)]
    pub skip_verify: bool,
    /// CA bundle path on the node for the endpoints (`ca`).
    #[serde(default)]
    pub ca_file: Option<String>,
    /// The endpoint URLs carry the API root in their path (containerd `override_path`).
    #[serde(default)]
    pub override_path: bool,
    /// Client certificate and key paths on the node that containerd presents to the endpoints
    /// (`client = [[cert, key]]`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_cert: Option<ClientCertFiles>,
}

fn default_dial_timeout() -> String {
    "3s".to_string()
}

/// Behaviour when the mirror cannot serve a pull.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Fallback {
    /// Fall back to the upstream registry (`server`).
    #[default]
    Upstream,
    /// Never contact the upstream from the node: only the mirror is configured.
    Never,
}

/// What one agent reports on `GET /status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AgentStatus {
    /// The node name (`--node-name`).
    pub node: String,
    /// `"<namespace>/<name>"` of the mirror whose desired state was last read (empty before).
    pub mirror: String,
    /// Generation of the desired state last applied (empty before the first apply).
    pub generation: String,
    /// Every desired registry is configured through a reachable mirror endpoint and containerd
    /// has no problem that would make it ignore the files.
    pub ready: bool,
    /// Per registry outcome, in desired order.
    pub registries: Vec<RegistryStatus>,
    /// Read-only findings about the runtime configuration.
    pub containerd: ContainerdStatus,
    /// Paths (on the node) of the files the agent currently manages for this mirror, sorted.
    pub managed_files: Vec<String>,
    /// Problems not tied to one registry (unreadable or invalid desired state).
    #[serde(default)]
    pub problems: Vec<Problem>,
}

/// Outcome for one desired registry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RegistryStatus {
    /// The registry as in [`DesiredRegistry::registry`].
    pub registry: String,
    /// Summary state.
    pub state: RegistryState,
    /// Machine-readable reason when not [`RegistryState::Configured`].
    #[serde(default)]
    pub reason: Option<Reason>,
    /// Human-readable detail.
    #[serde(default)]
    pub message: String,
}

/// Summary state of one registry on one node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RegistryState {
    /// The file routes pulls through at least one reachable mirror endpoint.
    Configured,
    /// No endpoint answers yet (or any more): the file is absent or falls back to upstream only.
    Unreachable,
    /// Not written: an administrator's file is in the way, or the entry is invalid.
    Blocked,
    /// Removed because the mirror is being deleted.
    Removed,
    /// Sent by a newer agent; unknown to this build.
    #[serde(other)]
    Unknown,
}

/// containerd configuration findings.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ContainerdStatus {
    /// `version` of config.toml (2 for containerd 1.x, 3 or 4 for 2.x; 1 when the file has none);
    /// `None` when unreadable or not containerd.
    #[serde(default)]
    pub config_version: Option<i64>,
    /// Problems found, each with a machine-readable reason.
    #[serde(default)]
    pub problems: Vec<Problem>,
}

/// One problem with a machine-readable reason.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Problem {
    /// Machine-readable reason.
    pub reason: Reason,
    /// Human-readable detail.
    pub message: String,
}

/// Machine-readable reasons, stable across releases (the operator copies them into
/// `NodesConfigured`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Reason {
    /// containerd's CRI registry `config_path` is not set, so certs.d is never read.
    ConfigPathNotSet,
    /// `config_path` is a `:`-separated list; containerd 2.x transfer mode uses only one directory.
    ConfigPathList,
    /// `config_path` does not point at the directory the agent writes to.
    ConfigPathMismatch,
    /// Legacy `registry.mirrors` are configured alongside (or instead of) `config_path`.
    LegacyMirrorsConfigured,
    /// config.toml could not be read or parsed.
    ContainerdConfigUnreadable,
    /// A `hosts.toml` without our marker exists; it was left untouched.
    AdminFileExists,
    /// No mirror endpoint answered `GET /v2/` from this node.
    MirrorUnreachable,
    /// The registry name would escape the certs directory or is not a host name.
    InvalidRegistryName,
    /// Another field of the desired registry is invalid (endpoint URL, duration, ...).
    InvalidDesiredRegistry,
    /// The desired-state file could not be read or parsed.
    DesiredStateInvalid,
    /// Writing or removing a file failed.
    WriteFailed,
    /// Docker Engine: `daemon.json` is not a JSON object with a list of strings as
    /// `registry-mirrors`; it was left untouched.
    DaemonJsonInvalid,
    /// The node's runtime cannot route this registry through a mirror (Docker Engine mirrors
    /// Docker Hub only).
    RuntimeUnsupported,
    /// The runtime's configuration changed and the runtime could not be sent SIGHUP to re-read
    /// it (pid file unreadable, stale, or no `hostPID`): it may still use the previous
    /// configuration (CRI-O's registries.conf, dockerd's daemon.json).
    RuntimeReloadFailed,
    /// The mirror's CA (`mirrorCaFile`) could not be read or holds no PEM certificate: nodes
    /// are configured without it, and the mirror's TLS endpoint does not answer the probe.
    MirrorCaInvalid,
    /// The node client certificate (`mirrorClientCert`) could not be read, or its certificate
    /// and key do not load: nodes are configured without it, and a mirror requiring mTLS does
    /// not answer the probe.
    MirrorClientCertInvalid,
    /// Sent by a newer agent; unknown to this build.
    #[serde(other)]
    Unknown,
}

impl Reason {
    /// The reason's stable name, as serialised.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ConfigPathNotSet => "ConfigPathNotSet",
            Self::ConfigPathList => "ConfigPathList",
            Self::ConfigPathMismatch => "ConfigPathMismatch",
            Self::LegacyMirrorsConfigured => "LegacyMirrorsConfigured",
            Self::ContainerdConfigUnreadable => "ContainerdConfigUnreadable",
            Self::AdminFileExists => "AdminFileExists",
            Self::MirrorUnreachable => "MirrorUnreachable",
            Self::InvalidRegistryName => "InvalidRegistryName",
            Self::InvalidDesiredRegistry => "InvalidDesiredRegistry",
            Self::DesiredStateInvalid => "DesiredStateInvalid",
            Self::WriteFailed => "WriteFailed",
            Self::DaemonJsonInvalid => "DaemonJsonInvalid",
            Self::RuntimeUnsupported => "RuntimeUnsupported",
            Self::RuntimeReloadFailed => "RuntimeReloadFailed",
            Self::MirrorCaInvalid => "MirrorCaInvalid",
            Self::MirrorClientCertInvalid => "MirrorClientCertInvalid",
            Self::Unknown => "Unknown",
        }
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    #[test]
    fn desired_state_reads_camel_case_with_defaults() {
        let json = r#"{"mirror":"ns/m","generation":"abc","registries":[
            {"registry":"docker.io","endpoints":["http://10.96.0.12:5000"]}],"futureField":1}"#;
        let d: DesiredState = serde_json::from_str(json).unwrap();
        assert_eq!(d.mirror, "ns/m");
        assert!(!d.removing);
        assert_eq!(d.runtime, Runtime::Containerd);
        assert_eq!(d.unreachable_after, "30s");
        let r = &d.registries[0];
        assert_eq!(r.fallback, Fallback::Upstream);
        assert_eq!(r.dial_timeout, "3s");
        assert_eq!(r.server, None);
    }

    #[test]
    fn unknown_reason_from_newer_agent_deserialises_as_unknown() {
        let p: Problem =
            serde_json::from_str(r#"{"reason":"SomethingNew","message":"x"}"#).unwrap();
        assert_eq!(p.reason, Reason::Unknown);
    }

    #[test]
    fn reason_serialises_as_its_stable_name() {
        let s = serde_json::to_string(&Reason::ConfigPathList).unwrap();
        assert_eq!(s, "\"ConfigPathList\"");
        assert_eq!(Reason::ConfigPathList.to_string(), "ConfigPathList");
    }
}
