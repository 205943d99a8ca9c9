//! The pure core of the agent: `reconcile_node(desired, observed, live) -> Plan`.
//!
//! Level-triggered: the plan depends only on what is desired, what is on disk and which endpoints
//! passed the gate, never on what changed. Applying a plan and planning again yields no actions.
//!
//! Invariants:
//! - A file is overwritten or removed only when its first line is our marker for *this* mirror.
//! - A file without marker is touched only in merge mode, and then its original is preserved
//!   (written first) and restored when we let go of the registry.
//! - Paths are built only from names that passed [`super::names::validate_registry`] or came from
//!   reading the directory itself (single components).
//! - The mirror's CA ([`NodeCa`]) and the node's client certificate and key
//!   ([`NodeClientCert`]), containerd only, are written beside a `hosts.toml` before the file
//!   that names them, and removed after the file that named them, so containerd never reads a
//!   `ca` or `client` path that does not exist; they carry the same marker as our `hosts.toml`.
//!   The key is never put in a log line ([`Action`]'s `Debug` leaves it out).

use std::collections::{BTreeMap, BTreeSet};

use super::names::validate_registry;
use super::protocol::{
    ClientCertFiles, DesiredRegistry, DesiredState, Fallback, Reason, RegistryState,
    RegistryStatus, Runtime,
};
use super::render::{
    crio_file_name, crio_unsupported, is_private_file, parse_marker, render_ca_file,
    render_crio_dropin, render_hosts_toml, render_pem_file, validate_registry_entry, RenderError,
    CA_FILE_NAME, CLIENT_CERT_FILE_NAME, CLIENT_KEY_FILE_NAME, HOSTS_FILE_NAME, ORIGINAL_FILE_NAME,
};

/// What is on disk in one host namespace directory (or for the CRI-O drop-in).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Existing {
    /// A regular file and its text.
    File(String),
    /// Something we must not touch or cannot read (symlink, not a regular file, too large,
    /// unreadable); the string says what.
    Unsafe(String),
}

/// One host namespace directory as scanned.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ObservedDir {
    /// `hosts.toml`, if present.
    pub hosts: Option<Existing>,
    /// The preserved administrator original, if present.
    pub original: Option<String>,
    /// The mirror's CA installed beside `hosts.toml` ([`CA_FILE_NAME`]), if present.
    pub ca: Option<Existing>,
    /// The node's client certificate installed beside `hosts.toml` ([`CLIENT_CERT_FILE_NAME`]).
    pub client_cert: Option<Existing>,
    /// Its private key ([`CLIENT_KEY_FILE_NAME`]).
    pub client_key: Option<Existing>,
}

impl ObservedDir {
    /// What is on disk for `file`, one of the files installed beside `hosts.toml`.
    #[must_use]
    pub fn companion(&self, file: &str) -> Option<&Existing> {
        match file {
            CA_FILE_NAME => self.ca.as_ref(),
            CLIENT_CERT_FILE_NAME => self.client_cert.as_ref(),
            CLIENT_KEY_FILE_NAME => self.client_key.as_ref(),
            _ => None,
        }
    }
}

/// The files installed beside `hosts.toml`, in the order they are written (and removed).
pub const COMPANION_FILES: [&str; 3] = [CA_FILE_NAME, CLIENT_CERT_FILE_NAME, CLIENT_KEY_FILE_NAME];

/// The mirror's CA as the agent found it (the PEM of the mounted `ca.crt`), and the certs
/// directory as containerd sees it, so that `hosts.toml` can name the installed copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeCa {
    /// PEM certificates.
    pub pem: String,
    /// containerd's certs.d on the host, e.g. `/etc/containerd/certs.d`.
    pub host_certs_dir: String,
}

impl NodeCa {
    /// The path containerd reads the CA of `registry` from.
    #[must_use]
    pub fn node_path(&self, registry: &str) -> String {
        format!(
            "{}/{registry}/{CA_FILE_NAME}",
            self.host_certs_dir.trim_end_matches('/')
        )
    }
}

/// The node's client certificate for a mirror that requires mTLS, as the agent found it (the
/// PEM of the mounted `tls.crt` and `tls.key`), and the certs directory as containerd sees it.
#[derive(Clone, PartialEq, Eq)]
pub struct NodeClientCert {
    /// PEM certificate (chain).
    pub cert_pem: String,
    /// PEM private key.
    pub key_pem: String,
    /// containerd's certs.d on the host, e.g. `/etc/containerd/certs.d`.
    pub host_certs_dir: String,
}

impl std::fmt::Debug for NodeClientCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeClientCert")
            .field("cert_pem", &self.cert_pem)
            .field("key_pem", &"<redacted>")
            .field("host_certs_dir", &self.host_certs_dir)
            .finish()
    }
}

impl NodeClientCert {
    /// The paths containerd reads the certificate and key of `registry` from.
    #[must_use]
    pub fn node_paths(&self, registry: &str) -> ClientCertFiles {
        let dir = format!("{}/{registry}", self.host_certs_dir.trim_end_matches('/'));
        ClientCertFiles {
            cert_file: format!("{dir}/{CLIENT_CERT_FILE_NAME}"),
            key_file: format!("{dir}/{CLIENT_KEY_FILE_NAME}"),
        }
    }
}

/// Everything the planner needs to know about the node's files.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Observed {
    /// Host namespace directories under the certs dir, by directory name.
    pub dirs: BTreeMap<String, ObservedDir>,
    /// The CRI-O drop-in of this mirror, if present.
    pub crio_file: Option<Existing>,
}

/// Which directory an action applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Root {
    /// The containerd certs.d directory.
    CertsDir,
    /// The CRI-O `registries.conf.d` directory.
    RegistriesConfDir,
}

/// One file-system step; executed in order. `Debug` leaves out the content of private files
/// ([`is_private_file`]), so an action can be logged.
#[derive(Clone, PartialEq, Eq)]
pub enum Action {
    /// Atomically write `dir/file` (`dir` empty for files directly in the root), creating `dir`.
    /// `previous` is what the planner saw; the executor refuses if the file changed since.
    Write {
        /// Root directory.
        root: Root,
        /// Subdirectory (a validated single component) or empty.
        dir: String,
        /// File name.
        file: String,
        /// New content.
        content: String,
        /// Content seen by the planner (`None`: absent).
        previous: Option<String>,
    },
    /// Remove our `dir/file`, then `dir` if it became empty.
    Remove {
        /// Root directory.
        root: Root,
        /// Subdirectory or empty.
        dir: String,
        /// File name.
        file: String,
    },
    /// Atomically put the preserved administrator original back as `dir/hosts.toml`.
    RestoreOriginal {
        /// Subdirectory of the certs dir.
        dir: String,
    },
}

impl std::fmt::Debug for Action {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Write {
                root,
                dir,
                file,
                content,
                previous,
            } => {
                let private = is_private_file(file);
                let shown = |text: &str| -> String {
                    if private {
                        format!("<{} bytes redacted>", text.len())
                    } else {
                        text.to_string()
                    }
                };
                f.debug_struct("Write")
                    .field("root", root)
                    .field("dir", dir)
                    .field("file", file)
                    .field("content", &shown(content))
                    .field("previous", &previous.as_deref().map(shown))
                    .finish()
            }
            Self::Remove { root, dir, file } => f
                .debug_struct("Remove")
                .field("root", root)
                .field("dir", dir)
                .field("file", file)
                .finish(),
            Self::RestoreOriginal { dir } => {
                f.debug_struct("RestoreOriginal").field("dir", dir).finish()
            }
        }
    }
}

/// The outcome of planning.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// Steps to execute in order.
    pub actions: Vec<Action>,
    /// Per desired registry, in desired order.
    pub registries: Vec<RegistryStatus>,
}

fn status(
    registry: &str,
    state: RegistryState,
    reason: Option<Reason>,
    message: String,
) -> RegistryStatus {
    RegistryStatus {
        registry: registry.to_string(),
        state,
        reason,
        message,
    }
}

fn invalid_status(reg: &DesiredRegistry, err: &RenderError) -> RegistryStatus {
    let reason = match err {
        RenderError::Name(super::names::ValidateNameError::Registry { .. }) => {
            Reason::InvalidRegistryName
        }
        // The administrator's file is in the way and cannot be merged.
        RenderError::ParseAdminFile { .. } => Reason::AdminFileExists,
        _ => Reason::InvalidDesiredRegistry,
    };
    status(
        &reg.registry,
        RegistryState::Blocked,
        Some(reason),
        err.to_string(),
    )
}

fn live_endpoints(reg: &DesiredRegistry, live: &BTreeSet<String>) -> Vec<String> {
    reg.endpoints
        .iter()
        .filter(|e| live.contains(*e))
        .cloned()
        .collect()
}

/// State of a registry whose file is (or will be) written with `live` endpoints.
fn written_status(reg: &DesiredRegistry, live: &[String]) -> RegistryStatus {
    if !live.is_empty() {
        return status(
            &reg.registry,
            RegistryState::Configured,
            None,
            format!("through {}", live.join(", ")),
        );
    }
    let message = match reg.fallback {
        Fallback::Upstream => format!(
            "no mirror endpoint answers GET /v2/ from this node ({}); pulls go to the upstream",
            reg.endpoints.join(", ")
        ),
        Fallback::Never => format!(
            "no mirror endpoint answers GET /v2/ from this node ({}); fallback Never keeps them configured",
            reg.endpoints.join(", ")
        ),
    };
    status(
        &reg.registry,
        RegistryState::Unreachable,
        Some(Reason::MirrorUnreachable),
        message,
    )
}

/// Plans the node's files for `desired`, given what is on disk and which endpoints are live.
#[must_use]
pub fn reconcile_node(
    desired: &DesiredState,
    observed: &Observed,
    live: &BTreeSet<String>,
) -> Plan {
    reconcile_node_with_tls(desired, observed, live, None, None)
}

/// [`reconcile_node`] for a mirror served over TLS: with its CA (`ca`), containerd's files get
/// it beside each `hosts.toml`, named as the endpoints' `ca`; with the nodes' client
/// certificate (`client`), the certificate and key beside each `hosts.toml`, named as the
/// endpoints' `client`. Without them, CA and client files of ours are removed.
#[must_use]
pub fn reconcile_node_with_tls(
    desired: &DesiredState,
    observed: &Observed,
    live: &BTreeSet<String>,
    ca: Option<&NodeCa>,
    client: Option<&NodeClientCert>,
) -> Plan {
    match desired.runtime {
        Runtime::Containerd => plan_containerd(desired, observed, live, ca, client),
        Runtime::Crio => {
            let mut plan = plan_crio(desired, observed, live);
            // A runtime switch must not leave containerd files of this mirror behind.
            plan.actions
                .extend(release_stale_hosts(desired, observed, &BTreeSet::new()));
            plan
        }
        // daemon.json is planned apart (`super::docker`); a runtime switch must not leave
        // containerd files of this mirror behind.
        Runtime::Docker => Plan {
            actions: release_stale_hosts(desired, observed, &BTreeSet::new()),
            registries: Vec::new(),
        },
    }
}

/// Whether `file` is a file of ours for this mirror.
fn is_ours(desired: &DesiredState, file: Option<&Existing>) -> bool {
    matches!(file, Some(Existing::File(text)) if parse_marker(text).is_some_and(|m| m.mirror == desired.mirror))
}

/// Removes our files beside `hosts.toml` in `name` that are not `wanted` (all of them with an
/// empty `wanted`).
fn release_companions(
    desired: &DesiredState,
    name: &str,
    dir: &ObservedDir,
    wanted: &[&str],
) -> Vec<Action> {
    COMPANION_FILES
        .iter()
        .filter(|file| !wanted.contains(file) && is_ours(desired, dir.companion(file)))
        .map(|file| Action::Remove {
            root: Root::CertsDir,
            dir: name.to_string(),
            file: (*file).into(),
        })
        .collect()
}

fn ours<'a>(desired: &DesiredState, dir: &'a ObservedDir) -> Option<(&'a str, bool)> {
    match &dir.hosts {
        Some(Existing::File(text)) => parse_marker(text)
            .filter(|m| m.mirror == desired.mirror)
            .map(|m| (text.as_str(), m.merged)),
        _ => None,
    }
}

/// Removes (or restores the original of) our hosts.toml in every directory not in `keep`.
fn release_stale_hosts(
    desired: &DesiredState,
    observed: &Observed,
    keep: &BTreeSet<&str>,
) -> Vec<Action> {
    let mut actions = Vec::new();
    for (name, dir) in &observed.dirs {
        if keep.contains(name.as_str()) || validate_registry(name).is_err() {
            continue;
        }
        if let Some((_, merged)) = ours(desired, dir) {
            if merged && dir.original.is_some() {
                actions.push(Action::RestoreOriginal { dir: name.clone() });
            } else {
                actions.push(Action::Remove {
                    root: Root::CertsDir,
                    dir: name.clone(),
                    file: HOSTS_FILE_NAME.into(),
                });
            }
        }
        // After the hosts.toml that named them.
        actions.extend(release_companions(desired, name, dir, &[]));
    }
    actions
}

/// Every desired registry reported as removed, while the mirror is being deleted.
fn removed_statuses(desired: &DesiredState) -> Vec<RegistryStatus> {
    desired
        .registries
        .iter()
        .map(|r| {
            status(
                &r.registry,
                RegistryState::Removed,
                None,
                "mirror is being deleted".into(),
            )
        })
        .collect()
}

fn plan_containerd(
    desired: &DesiredState,
    observed: &Observed,
    live: &BTreeSet<String>,
    ca: Option<&NodeCa>,
    client: Option<&NodeClientCert>,
) -> Plan {
    let mut plan = Plan::default();
    let mut keep: BTreeSet<&str> = BTreeSet::new();
    if desired.removing {
        plan.actions = release_stale_hosts(desired, observed, &keep);
        plan.registries = removed_statuses(desired);
        return plan;
    }
    let mut seen = BTreeSet::new();
    for reg in &desired.registries {
        if let Err(err) = validate_registry_entry(reg) {
            // Keep whatever we wrote before for a valid name: a bad edit must not unconfigure
            // nodes that work.
            if validate_registry(&reg.registry).is_ok() {
                keep.insert(&reg.registry);
            }
            plan.registries.push(invalid_status(reg, &err));
            continue;
        }
        if !seen.insert(reg.registry.as_str()) {
            plan.registries.push(status(
                &reg.registry,
                RegistryState::Blocked,
                Some(Reason::InvalidDesiredRegistry),
                "registry listed twice; the first entry wins".into(),
            ));
            continue;
        }
        let live_eps = live_endpoints(reg, live);
        if live_eps.is_empty()
            && reg.fallback == Fallback::Upstream
            && super::render::upstream_server(reg).is_none()
        {
            // `_default` with no live endpoint: there is no server to name, and a file without a
            // `[host]` is invalid for containerd 1.6, so no file at all (ours is released below).
            plan.registries.push(written_status(reg, &live_eps));
            continue;
        }
        keep.insert(&reg.registry);
        let empty = ObservedDir::default();
        let dir = observed.dirs.get(&reg.registry).unwrap_or(&empty);
        let previous = match &dir.hosts {
            Some(Existing::File(text)) => Some(text.clone()),
            _ => None,
        };
        // The files installed beside hosts.toml: (file name, content) in write order.
        let mut companions: Vec<(&str, String)> = Vec::new();
        if let Some(ca) = ca {
            companions.push((CA_FILE_NAME, render_ca_file(&desired.mirror, &ca.pem)));
        }
        if let Some(client) = client {
            companions.push((
                CLIENT_CERT_FILE_NAME,
                render_pem_file(&desired.mirror, &client.cert_pem),
            ));
            companions.push((
                CLIENT_KEY_FILE_NAME,
                render_pem_file(&desired.mirror, &client.key_pem),
            ));
        }
        if let Some((foreign, _)) = companions.iter().find(|(file, _)| {
            dir.companion(file).is_some() && !is_ours(desired, dir.companion(file))
        }) {
            plan.registries.push(status(
                &reg.registry,
                RegistryState::Blocked,
                Some(Reason::AdminFileExists),
                format!(
                    "{}/{foreign} exists without the cachalot marker; left untouched",
                    reg.registry
                ),
            ));
            continue;
        }
        let admin_base: Option<&str> = match &dir.hosts {
            None => None,
            Some(Existing::Unsafe(why)) => {
                plan.registries.push(status(
                    &reg.registry,
                    RegistryState::Blocked,
                    Some(Reason::AdminFileExists),
                    format!("{}/{HOSTS_FILE_NAME} left untouched: {why}", reg.registry),
                ));
                continue;
            }
            Some(Existing::File(text)) => match parse_marker(text) {
                Some(m) if m.mirror == desired.mirror => {
                    if m.merged {
                        match &dir.original {
                            Some(original) => Some(original.as_str()),
                            None => {
                                plan.registries.push(status(
                                    &reg.registry,
                                    RegistryState::Blocked,
                                    Some(Reason::AdminFileExists),
                                    format!("merged file without its preserved {ORIGINAL_FILE_NAME}; left untouched"),
                                ));
                                continue;
                            }
                        }
                    } else {
                        None
                    }
                }
                Some(m) => {
                    plan.registries.push(status(
                        &reg.registry,
                        RegistryState::Blocked,
                        Some(Reason::AdminFileExists),
                        format!(
                            "{}/{HOSTS_FILE_NAME} is managed by mirror {}",
                            reg.registry, m.mirror
                        ),
                    ));
                    continue;
                }
                None if desired.merge_with_admin_file => {
                    // Preserve the original first: a crash between the two writes leaves the
                    // admin file in place and the next round redoes both.
                    plan.actions.push(Action::Write {
                        root: Root::CertsDir,
                        dir: reg.registry.clone(),
                        file: ORIGINAL_FILE_NAME.into(),
                        content: text.clone(),
                        previous: dir.original.clone(),
                    });
                    Some(text.as_str())
                }
                None => {
                    plan.registries.push(status(
                        &reg.registry,
                        RegistryState::Blocked,
                        Some(Reason::AdminFileExists),
                        format!(
                            "{}/{HOSTS_FILE_NAME} exists without the cachalot marker; left untouched \
                             (set mergeWithAdminFile to merge)",
                            reg.registry
                        ),
                    ));
                    continue;
                }
            },
        };
        let with_tls;
        let reg = if ca.is_some() || client.is_some() {
            with_tls = DesiredRegistry {
                ca_file: ca
                    .map(|ca| ca.node_path(&reg.registry))
                    .or(reg.ca_file.clone()),
                client_cert: client
                    .map(|c| c.node_paths(&reg.registry))
                    .or(reg.client_cert.clone()),
                ..reg.clone()
            };
            &with_tls
        } else {
            reg
        };
        match render_hosts_toml(&desired.mirror, reg, &live_eps, admin_base) {
            Ok(content) => {
                // The companions first: the hosts.toml written next names them.
                for (file, content) in &companions {
                    let previous = match dir.companion(file) {
                        Some(Existing::File(text)) => Some(text.clone()),
                        _ => None,
                    };
                    if previous.as_deref() != Some(content.as_str()) {
                        plan.actions.push(Action::Write {
                            root: Root::CertsDir,
                            dir: reg.registry.clone(),
                            file: (*file).into(),
                            content: content.clone(),
                            previous,
                        });
                    }
                }
                if previous.as_deref() != Some(content.as_str()) {
                    plan.actions.push(Action::Write {
                        root: Root::CertsDir,
                        dir: reg.registry.clone(),
                        file: HOSTS_FILE_NAME.into(),
                        content,
                        previous,
                    });
                }
                // After the hosts.toml that no longer names them.
                let wanted: Vec<&str> = companions.iter().map(|(file, _)| *file).collect();
                plan.actions
                    .extend(release_companions(desired, &reg.registry, dir, &wanted));
                plan.registries.push(written_status(reg, &live_eps));
            }
            Err(err) => {
                // A merge that failed must not leave a half-done preservation step queued.
                plan.actions.retain(|a| !matches!(a, Action::Write { dir, file, .. } if *dir == reg.registry && file == ORIGINAL_FILE_NAME));
                plan.registries.push(invalid_status(reg, &err));
            }
        }
    }
    plan.actions
        .extend(release_stale_hosts(desired, observed, &keep));
    plan
}

fn plan_crio(desired: &DesiredState, observed: &Observed, live: &BTreeSet<String>) -> Plan {
    let mut plan = Plan::default();
    let file = match crio_file_name(&desired.mirror) {
        Ok(f) => f,
        Err(err) => {
            plan.registries = desired
                .registries
                .iter()
                .map(|r| invalid_status(r, &err))
                .collect();
            return plan;
        }
    };
    let (previous, is_ours) = match &observed.crio_file {
        None => (None, true),
        Some(Existing::Unsafe(_)) => (None, false),
        Some(Existing::File(text)) => (
            Some(text.clone()),
            parse_marker(text).is_some_and(|m| m.mirror == desired.mirror),
        ),
    };
    if !is_ours {
        plan.registries = desired
            .registries
            .iter()
            .map(|r| {
                status(
                    &r.registry,
                    RegistryState::Blocked,
                    Some(Reason::AdminFileExists),
                    format!("{file} exists without the cachalot marker; left untouched"),
                )
            })
            .collect();
        return plan;
    }
    if desired.removing {
        if previous.is_some() {
            plan.actions.push(Action::Remove {
                root: Root::RegistriesConfDir,
                dir: String::new(),
                file,
            });
        }
        plan.registries = removed_statuses(desired);
        return plan;
    }
    let mut entries = Vec::new();
    for reg in &desired.registries {
        match validate_registry_entry(reg) {
            Ok(()) => match crio_unsupported(&reg.registry) {
                None => {
                    let live_eps = live_endpoints(reg, live);
                    plan.registries.push(written_status(reg, &live_eps));
                    entries.push((reg, live_eps));
                }
                Some(why) => plan.registries.push(status(
                    &reg.registry,
                    RegistryState::Blocked,
                    Some(Reason::InvalidDesiredRegistry),
                    format!("not configured for CRI-O: {why}"),
                )),
            },
            Err(err) => plan.registries.push(invalid_status(reg, &err)),
        }
    }
    match render_crio_dropin(&desired.mirror, &entries) {
        Ok(content) if previous.as_deref() != Some(content.as_str()) => {
            plan.actions.push(Action::Write {
                root: Root::RegistriesConfDir,
                dir: String::new(),
                file,
                content,
                previous,
            });
        }
        Ok(_) => {}
        Err(err) => {
            for s in &mut plan.registries {
                s.state = RegistryState::Blocked;
                s.reason = Some(Reason::InvalidDesiredRegistry);
                s.message = err.to_string();
            }
        }
    }
    plan
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;
    use crate::node_agent::render::marker_line;

    const EP: &str = "http://10.0.0.1:5000";

    fn reg(name: &str) -> DesiredRegistry {
        DesiredRegistry {
            registry: name.into(),
            server: None,
            endpoints: vec![EP.into()],
            fallback: Fallback::Upstream,
            dial_timeout: "1s".into(),
            skip_verify: false,
            ca_file: None,
            override_path: false,
            client_cert: None,
        }
    }

    fn state(registries: Vec<DesiredRegistry>) -> DesiredState {
        DesiredState {
            mirror: "ns/m".into(),
            generation: "g".into(),
            removing: false,
            runtime: Runtime::Containerd,
            registries,
            unreachable_after: "30s".into(),
            merge_with_admin_file: false,
            mirror_ca_file: None,
            mirror_client_cert: None,
        }
    }

    fn dir(text: &str, original: Option<&str>) -> ObservedDir {
        ObservedDir {
            hosts: Some(Existing::File(text.into())),
            original: original.map(str::to_string),
            ..ObservedDir::default()
        }
    }

    #[test]
    fn removing_releases_ours_restores_merged_and_leaves_others() {
        let mut observed = Observed::default();
        observed.dirs.insert(
            "docker.io".into(),
            dir(&format!("{}\nx", marker_line("ns/m", false)), None),
        );
        observed.dirs.insert(
            "ghcr.io".into(),
            dir(&format!("{}\nx", marker_line("ns/m", true)), Some("admin")),
        );
        observed
            .dirs
            .insert("quay.io".into(), dir("server = \"https://quay.io\"", None));
        observed
            .dirs
            .insert("gcr.io".into(), dir(&marker_line("other/m", false), None));
        let mut desired = state(vec![reg("docker.io")]);
        desired.removing = true;
        let plan = reconcile_node(&desired, &observed, &BTreeSet::new());
        assert_eq!(
            plan.actions,
            [
                Action::Remove {
                    root: Root::CertsDir,
                    dir: "docker.io".into(),
                    file: HOSTS_FILE_NAME.into()
                },
                Action::RestoreOriginal {
                    dir: "ghcr.io".into()
                },
            ]
        );
        assert_eq!(plan.registries[0].state, RegistryState::Removed);
    }

    #[test]
    fn a_registry_listed_twice_is_written_once_and_reported() {
        let live: BTreeSet<String> = [EP.to_string()].into();
        let plan = reconcile_node(
            &state(vec![reg("docker.io"), reg("docker.io")]),
            &Observed::default(),
            &live,
        );
        assert_eq!(plan.actions.len(), 1);
        assert_eq!(
            plan.registries[1].reason,
            Some(Reason::InvalidDesiredRegistry)
        );
    }

    #[test]
    fn merge_mode_preserves_the_original_before_writing_the_merged_file() {
        let mut observed = Observed::default();
        observed.dirs.insert(
            "docker.io".into(),
            dir("server = \"https://registry-1.docker.io\"\n", None),
        );
        let mut desired = state(vec![reg("docker.io")]);
        desired.merge_with_admin_file = true;
        let live: BTreeSet<String> = [EP.to_string()].into();
        let plan = reconcile_node(&desired, &observed, &live);
        let files: Vec<&str> = plan
            .actions
            .iter()
            .map(|a| match a {
                Action::Write { file, .. } => file.as_str(),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(files, [ORIGINAL_FILE_NAME, HOSTS_FILE_NAME]);
    }

    #[test]
    fn merge_with_unparsable_admin_file_queues_nothing() {
        let mut observed = Observed::default();
        observed
            .dirs
            .insert("docker.io".into(), dir("server = = broken", None));
        let mut desired = state(vec![reg("docker.io")]);
        desired.merge_with_admin_file = true;
        let plan = reconcile_node(&desired, &observed, &[EP.to_string()].into());
        assert_eq!(plan.actions, []);
        assert_eq!(plan.registries[0].reason, Some(Reason::AdminFileExists));
    }
}
