//! Pure rendering of node files from the desired state: containerd `hosts.toml` (per registry)
//! and the CRI-O `registries.conf.d` drop-in (per mirror), both through the `toml` crate so that
//! quoting can never be wrong, plus the managed-by marker that proves a file is ours.
//!
//! Invariants:
//! - Every rendered file starts with [`marker_line`]; [`parse_marker`] is its only reader.
//! - Host order in the output is the endpoint order given (containerd tries hosts in file order;
//!   the crate's `preserve_order` feature keeps it).
//! - With fallback `Never` the file never names the upstream: the last endpoint becomes `server`
//!   (containerd would otherwise fall back to the registry's own host when `server` is absent).
//! - Every hosts.toml has at least one `[host]` table: containerd 1.6 rejects a file without one
//!   ("invalid `host` tree") and silently falls back to the default host, ignoring `server`.

use serde::Serialize;
use toml::{Table, Value};

use super::duration::parse_duration;
use super::names::{
    parse_endpoint, validate_mirror, validate_registry, ValidateNameError, DEFAULT_NAMESPACE,
};
use super::protocol::{DesiredRegistry, Fallback};

/// First-line prefix of every file the agent manages. Defined once; everything else uses
/// [`marker_line`] and [`parse_marker`].
pub const MARKER_PREFIX: &str = "# managed-by: cachalot mirror=";
/// Suffix on the marker line of a file merged with an administrator's original.
const MERGED_TAG: &str = " merged-original=";
/// Name of the preserved administrator original next to a merged `hosts.toml`.
pub const ORIGINAL_FILE_NAME: &str = "hosts.toml.cachalot-orig";
/// The file containerd reads in each host namespace directory.
pub const HOSTS_FILE_NAME: &str = "hosts.toml";
/// The mirror's CA as the agent installs it beside `hosts.toml` (named there as `ca`).
pub const CA_FILE_NAME: &str = "cachalot-ca.crt";
/// The node's client certificate for the mirror as the agent installs it beside `hosts.toml`
/// (named there, with [`CLIENT_KEY_FILE_NAME`], as `client`). `.crt`, not `.cert`: containerd
/// reads docker-style `*.cert`/`*.key` pairs only from a directory without `hosts.toml`, and the
/// agent never writes one there.
pub const CLIENT_CERT_FILE_NAME: &str = "cachalot-client.crt";
/// The private key of [`CLIENT_CERT_FILE_NAME`]; written with mode 0600.
pub const CLIENT_KEY_FILE_NAME: &str = "cachalot-client.key";
/// Docker Hub's API host: `docker.io` is only a name.
pub const DOCKER_HUB_SERVER: &str = "https://registry-1.docker.io";

/// Capabilities of a private mirror: it may pull and resolve tags, never push.
const MIRROR_CAPABILITIES: [&str; 2] = ["pull", "resolve"];

/// Rendering failed because an input is invalid (nothing is written then).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RenderError {
    /// A name or URL is invalid.
    #[error(transparent)]
    Name(#[from] ValidateNameError),
    /// `dialTimeout` is not a Go duration.
    #[error("dialTimeout of {registry}: {source}")]
    DialTimeout {
        /// The registry concerned.
        registry: String,
        /// The parse failure.
        source: super::duration::ParseDurationError,
    },
    /// Fallback `Never` with no endpoint would leave nothing to pull from.
    #[error("registry {registry} has fallback Never but no endpoint")]
    NeverWithoutEndpoint {
        /// The registry concerned.
        registry: String,
    },
    /// The registry cannot be expressed for CRI-O.
    #[error("registry {registry} cannot be configured for CRI-O: {why}")]
    CrioUnsupported {
        /// The registry concerned.
        registry: String,
        /// Why.
        why: &'static str,
    },
    /// The administrator's file to merge with is not valid TOML.
    #[error("the existing hosts.toml of {registry} is not valid TOML: {message}")]
    ParseAdminFile {
        /// The registry concerned.
        registry: String,
        /// The parser's message.
        message: String,
    },
    /// The TOML serialiser refused the document (should not happen for our shapes).
    #[error("serialising TOML: {0}")]
    Serialize(String),
}

/// A parsed marker line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Marker {
    /// `"<namespace>/<name>"` of the owning mirror.
    pub mirror: String,
    /// The file was merged with an administrator's original, kept as [`ORIGINAL_FILE_NAME`].
    pub merged: bool,
}

/// The marker line (without newline) for files of `mirror`.
#[must_use]
pub fn marker_line(mirror: &str, merged: bool) -> String {
    if merged {
        format!("{MARKER_PREFIX}{mirror}{MERGED_TAG}{ORIGINAL_FILE_NAME}")
    } else {
        format!("{MARKER_PREFIX}{mirror}")
    }
}

/// Reads the marker from a file's first line; `None` means the file is not ours.
#[must_use]
pub fn parse_marker(text: &str) -> Option<Marker> {
    let first = text.lines().next()?;
    let rest = first.strip_prefix(MARKER_PREFIX)?;
    let (mirror, merged) = match rest.split_once(MERGED_TAG) {
        Some((m, _)) => (m, true),
        None => (rest, false),
    };
    let mirror = mirror.trim();
    validate_mirror(mirror).ok()?;
    Some(Marker {
        mirror: mirror.to_string(),
        merged,
    })
}

/// The CA file beside `hosts.toml`: see [`render_pem_file`].
#[must_use]
pub fn render_ca_file(mirror: &str, pem: &str) -> String {
    render_pem_file(mirror, pem)
}

/// A PEM file beside `hosts.toml` (the CA, the client certificate or its key): our marker line,
/// then the PEM as given (PEM readers, Go's `encoding/pem` under `tls.LoadX509KeyPair` and
/// rustls', skip text outside `-----BEGIN`/`-----END` blocks), ending with a newline.
#[must_use]
pub fn render_pem_file(mirror: &str, pem: &str) -> String {
    let mut text = marker_line(mirror, false);
    text.push('\n');
    text.push_str(pem.trim_end());
    text.push('\n');
    text
}

/// Whether the agent's file `file` holds a secret (the client key): it is written readable by
/// its owner (root) only, and its content is never logged.
#[must_use]
pub fn is_private_file(file: &str) -> bool {
    file == CLIENT_KEY_FILE_NAME
}

/// The upstream URL for a registry: the explicit `server`, else Docker Hub's API host for
/// `docker.io`, else `https://<registry>`; `None` for `_default` (containerd then uses the
/// image's own registry host).
#[must_use]
pub fn upstream_server(reg: &DesiredRegistry) -> Option<String> {
    if let Some(server) = &reg.server {
        return Some(server.clone());
    }
    match reg.registry.as_str() {
        DEFAULT_NAMESPACE => None,
        "docker.io" => Some(DOCKER_HUB_SERVER.to_string()),
        other => Some(format!("https://{other}")),
    }
}

/// Checks every field of a desired registry that ends up in a file.
///
/// # Errors
/// The first invalid field.
pub fn validate_registry_entry(reg: &DesiredRegistry) -> Result<(), RenderError> {
    validate_registry(&reg.registry)?;
    for endpoint in &reg.endpoints {
        parse_endpoint(endpoint)?;
    }
    if let Some(server) = &reg.server {
        parse_endpoint(server)?;
    }
    parse_duration(&reg.dial_timeout).map_err(|source| RenderError::DialTimeout {
        registry: reg.registry.clone(),
        source,
    })?;
    if reg.fallback == Fallback::Never && reg.endpoints.is_empty() {
        return Err(RenderError::NeverWithoutEndpoint {
            registry: reg.registry.clone(),
        });
    }
    Ok(())
}

/// Whether containerd must take `endpoint`'s path as the API root (`override_path`): only for an
/// endpoint that has a path, and then when asked to or when the path already ends in `/v2`
/// (containerd would otherwise append a second `/v2`). A bare `http://host:port` never needs it.
#[must_use]
pub fn needs_override_path(reg: &DesiredRegistry, endpoint: &str) -> bool {
    let Ok(url) = parse_endpoint(endpoint) else {
        return false;
    };
    let path = url.path().trim_end_matches('/');
    !path.is_empty() && (reg.override_path || path.ends_with("/v2"))
}

/// The per-mirror-host settings, shared by `[host."…"]` tables and (for fallback `Never`) the
/// top level, which configures `server`.
fn host_settings(reg: &DesiredRegistry, endpoint: &str, into: &mut Table) {
    let caps = MIRROR_CAPABILITIES
        .iter()
        .map(|c| Value::String((*c).to_string()))
        .collect();
    into.insert("capabilities".into(), Value::Array(caps));
    into.insert(
        "dial_timeout".into(),
        Value::String(reg.dial_timeout.clone()),
    );
    if reg.skip_verify {
        into.insert("skip_verify".into(), Value::Boolean(true));
    }
    if let Some(ca) = &reg.ca_file {
        into.insert("ca".into(), Value::String(ca.clone()));
    }
    if let Some(client) = &reg.client_cert {
        // containerd's pair form: `[[cert, key]]`.
        let pair = vec![
            Value::String(client.cert_file.clone()),
            Value::String(client.key_file.clone()),
        ];
        into.insert("client".into(), Value::Array(vec![Value::Array(pair)]));
    }
    if needs_override_path(reg, endpoint) {
        into.insert("override_path".into(), Value::Boolean(true));
    }
}

/// Renders `certs.d/<registry>/hosts.toml` for `reg`, listing only `live_endpoints` (the ones
/// that passed the reachability gate, in desired order) as mirror hosts.
///
/// With `admin_original` (merge mode) the administrator's top-level settings are kept, our hosts
/// come first and theirs follow; the marker records that an original was preserved.
///
/// # Errors
/// Invalid input (see [`validate_registry_entry`]) or an unparsable administrator file.
pub fn render_hosts_toml(
    mirror: &str,
    reg: &DesiredRegistry,
    live_endpoints: &[String],
    admin_original: Option<&str>,
) -> Result<String, RenderError> {
    validate_mirror(mirror)?;
    validate_registry_entry(reg)?;
    let mut top = Table::new();
    let mut hosts = Table::new();
    match reg.fallback {
        Fallback::Upstream => {
            let server = upstream_server(reg);
            if let Some(server) = &server {
                top.insert("server".into(), Value::String(server.clone()));
            }
            for endpoint in live_endpoints {
                let mut host = Table::new();
                host_settings(reg, endpoint, &mut host);
                hosts.insert(endpoint.clone(), Value::Table(host));
            }
            if let (true, Some(server)) = (hosts.is_empty(), &server) {
                // containerd 1.6 rejects a hosts.toml without any `[host]` table ("invalid
                // `host` tree") and then ignores `server`; name the upstream as the host.
                let caps = MIRROR_CAPABILITIES
                    .iter()
                    .map(|c| Value::String((*c).to_string()))
                    .collect();
                let mut host = Table::new();
                host.insert("capabilities".into(), Value::Array(caps));
                hosts.insert(server.clone(), Value::Table(host));
            }
        }
        Fallback::Never => {
            // Never: all endpoints are written whatever the gate says (there is nothing else to
            // pull from), and the last one is also the `server` so the upstream is never tried
            // (without `server` containerd falls back to the registry's own host). Every endpoint
            // stays a `[host]` too, because containerd 1.6 rejects a file without one.
            let last = reg
                .endpoints
                .last()
                .ok_or_else(|| RenderError::NeverWithoutEndpoint {
                    registry: reg.registry.clone(),
                })?;
            top.insert("server".into(), Value::String(last.clone()));
            host_settings(reg, last, &mut top);
            for endpoint in &reg.endpoints {
                let mut host = Table::new();
                host_settings(reg, endpoint, &mut host);
                hosts.insert(endpoint.clone(), Value::Table(host));
            }
        }
    }
    if let Some(original) = admin_original {
        let admin: Table =
            original
                .parse()
                .map_err(|e: toml::de::Error| RenderError::ParseAdminFile {
                    registry: reg.registry.clone(),
                    message: e.message().to_string(),
                })?;
        for (key, value) in admin {
            if key == "host" {
                if let Value::Table(admin_hosts) = value {
                    for (url, host) in admin_hosts {
                        hosts.entry(url).or_insert(host);
                    }
                }
            } else if reg.fallback == Fallback::Upstream || !top.contains_key(&key) {
                // Upstream fallback: the administrator's own server and settings win, only our
                // hosts are put in front. Never: our server must stay.
                top.insert(key, value);
            }
        }
    }
    if !hosts.is_empty() {
        top.insert("host".into(), Value::Table(hosts));
    }
    let body = toml::to_string(&top).map_err(|e| RenderError::Serialize(e.to_string()))?;
    Ok(format!(
        "{}\n{body}",
        marker_line(mirror, admin_original.is_some())
    ))
}

#[derive(Serialize)]
struct CrioConf {
    registry: Vec<CrioRegistry>,
}

#[derive(Serialize)]
struct CrioRegistry {
    prefix: String,
    location: String,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    insecure: bool,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    mirror: Vec<CrioMirror>,
}

#[derive(Serialize)]
struct CrioMirror {
    location: String,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    insecure: bool,
}

/// A URL as a registries.conf location (`host[:port][/path]`, no scheme) and whether it is
/// plain HTTP or unverified TLS (`insecure`).
fn crio_location(url: &str, skip_verify: bool) -> Result<(String, bool), RenderError> {
    let parsed = parse_endpoint(url)?;
    let host = parsed.host_str().unwrap_or_default();
    let mut location = match parsed.port() {
        Some(port) => format!("{host}:{port}"),
        None => host.to_string(),
    };
    let path = parsed.path().trim_matches('/');
    let path = path
        .strip_suffix("v2")
        .unwrap_or(path)
        .trim_end_matches('/');
    if !path.is_empty() {
        location.push('/');
        location.push_str(path);
    }
    Ok((location, parsed.scheme() == "http" || skip_verify))
}

/// A mirror endpoint as the registries.conf location of `registry`'s mirror: the endpoint's
/// location with the path prefix `/<registry>` appended. containers/image never sends `ns`, so
/// the prefix is how one cachalot endpoint tells the registries apart (cachalot's path-prefix
/// routing: `/v2/<registry>/<repository>/...`).
fn crio_mirror_location(
    url: &str,
    skip_verify: bool,
    registry: &str,
) -> Result<(String, bool), RenderError> {
    let (location, insecure) = crio_location(url, skip_verify)?;
    Ok((format!("{location}/{registry}"), insecure))
}

/// Why `registry` cannot be mirrored through a CRI-O drop-in, if it cannot: `_default` has no
/// registries.conf equivalent, and a registry with a port cannot be a path prefix (containers/image
/// rejects `10.96.0.12:5000/registry.local:5000/app` as an invalid reference).
#[must_use]
pub fn crio_unsupported(registry: &str) -> Option<&'static str> {
    if registry == DEFAULT_NAMESPACE {
        Some("CRI-O has no catch-all registry (_default)")
    } else if registry.contains(':') {
        Some("a registry with a port cannot be a mirror path prefix (containers/image refuses `:` in a repository path)")
    } else {
        None
    }
}

/// The CRI-O drop-in file name for `mirror` (`50-cachalot-<namespace>-<name>.conf`).
///
/// # Errors
/// An invalid mirror name.
pub fn crio_file_name(mirror: &str) -> Result<String, RenderError> {
    validate_mirror(mirror)?;
    Ok(format!("50-cachalot-{}.conf", mirror.replace('/', "-")))
}

/// Renders the `registries.conf.d` drop-in for all of `registries`, each paired with its live
/// endpoints. Every mirror location carries the registry as a path prefix
/// (`10.96.0.12:5000/ghcr.io`), so one endpoint mirrors every registry of the mirror. A registry without live endpoints (and fallback `Upstream`) is left out: CRI-O
/// then uses the registry directly, which is the fallback.
///
/// # Errors
/// Invalid input, or `_default` (CRI-O has no catch-all prefix).
pub fn render_crio_dropin(
    mirror: &str,
    registries: &[(&DesiredRegistry, Vec<String>)],
) -> Result<String, RenderError> {
    validate_mirror(mirror)?;
    let mut conf = CrioConf {
        registry: Vec::new(),
    };
    for (reg, live) in registries {
        validate_registry_entry(reg)?;
        if let Some(why) = crio_unsupported(&reg.registry) {
            return Err(RenderError::CrioUnsupported {
                registry: reg.registry.clone(),
                why,
            });
        }
        let mirrors_of = |urls: &[String]| -> Result<Vec<CrioMirror>, RenderError> {
            urls.iter()
                .map(|u| {
                    crio_mirror_location(u, reg.skip_verify, &reg.registry)
                        .map(|(location, insecure)| CrioMirror { location, insecure })
                })
                .collect()
        };
        let entry = match reg.fallback {
            Fallback::Upstream => {
                if live.is_empty() {
                    continue;
                }
                let (location, insecure) = match upstream_server(reg) {
                    Some(server) => crio_location(&server, false)?,
                    None => (reg.registry.clone(), false),
                };
                CrioRegistry {
                    prefix: reg.registry.clone(),
                    location,
                    insecure,
                    mirror: mirrors_of(live)?,
                }
            }
            Fallback::Never => {
                let (last, first) = reg.endpoints.split_last().ok_or_else(|| {
                    RenderError::NeverWithoutEndpoint {
                        registry: reg.registry.clone(),
                    }
                })?;
                let (location, insecure) =
                    crio_mirror_location(last, reg.skip_verify, &reg.registry)?;
                CrioRegistry {
                    prefix: reg.registry.clone(),
                    location,
                    insecure,
                    mirror: mirrors_of(first)?,
                }
            }
        };
        conf.registry.push(entry);
    }
    let body = toml::to_string(&conf).map_err(|e| RenderError::Serialize(e.to_string()))?;
    Ok(format!("{}\n{body}", marker_line(mirror, false)))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    fn reg(name: &str, endpoints: &[&str]) -> DesiredRegistry {
        DesiredRegistry {
            registry: name.to_string(),
            server: None,
            endpoints: endpoints.iter().map(|e| (*e).to_string()).collect(),
            fallback: Fallback::Upstream,
            dial_timeout: "3s".to_string(),
            skip_verify: false,
            ca_file: None,
            override_path: false,
            client_cert: None,
        }
    }

    #[test]
    fn marker_round_trips_and_foreign_first_lines_are_not_ours() {
        assert_eq!(
            parse_marker(&marker_line("a/b", false)),
            Some(Marker {
                mirror: "a/b".into(),
                merged: false
            })
        );
        assert!(
            parse_marker(&format!("{}\nx", marker_line("a/b", true)))
                .unwrap()
                .merged
        );
        assert_eq!(
            parse_marker("server = \"x\"\n# managed-by: cachalot mirror=a/b"),
            None
        );
        assert_eq!(parse_marker("# managed-by: cachalot mirror=../x"), None);
    }

    #[test]
    fn rendered_hosts_toml_parses_back_with_hosts_in_endpoint_order() {
        let r = reg("docker.io", &["http://b:5000", "http://a:5000"]);
        let live = r.endpoints.clone();
        let text = render_hosts_toml("ns/m", &r, &live, None).unwrap();
        let table: Table = text.parse().unwrap();
        let hosts: Vec<&String> = table["host"].as_table().unwrap().keys().collect();
        assert_eq!(hosts, ["http://b:5000", "http://a:5000"]);
        assert_eq!(table["server"].as_str(), Some(DOCKER_HUB_SERVER));
    }

    #[test]
    fn merge_puts_our_hosts_ahead_and_keeps_admin_settings() {
        let r = reg("docker.io", &["http://mirror:5000"]);
        let admin = "server = \"https://admin.example\"\n[host.\"https://admin-mirror\"]\ncapabilities = [\"pull\"]\n";
        let text = render_hosts_toml("ns/m", &r, &r.endpoints.clone(), Some(admin)).unwrap();
        assert!(parse_marker(&text).unwrap().merged);
        let table: Table = text.parse().unwrap();
        let hosts: Vec<&String> = table["host"].as_table().unwrap().keys().collect();
        assert_eq!(hosts, ["http://mirror:5000", "https://admin-mirror"]);
        assert_eq!(table["server"].as_str(), Some("https://admin.example"));
    }

    #[test]
    fn merge_with_invalid_admin_toml_is_an_error_not_a_panic() {
        let r = reg("docker.io", &["http://mirror:5000"]);
        let err =
            render_hosts_toml("ns/m", &r, &r.endpoints.clone(), Some("server = ")).unwrap_err();
        assert!(matches!(err, RenderError::ParseAdminFile { .. }));
    }

    #[test]
    fn never_without_endpoints_is_rejected() {
        let mut r = reg("docker.io", &[]);
        r.fallback = Fallback::Never;
        assert!(matches!(
            render_hosts_toml("ns/m", &r, &[], None),
            Err(RenderError::NeverWithoutEndpoint { .. })
        ));
    }

    #[test]
    fn default_namespace_has_no_server_line() {
        let r = reg("_default", &["http://m:5000"]);
        let table: Table = render_hosts_toml("ns/m", &r, &r.endpoints.clone(), None)
            .unwrap()
            .parse()
            .unwrap();
        assert!(!table.contains_key("server"));
    }

    #[test]
    fn a_client_certificate_is_rendered_as_containerds_pair_for_every_mirror_host() {
        let mut r = reg("docker.io", &["https://a:5000", "https://b:5000"]);
        r.ca_file = Some("/etc/containerd/certs.d/docker.io/cachalot-ca.crt".into());
        r.client_cert = Some(super::super::protocol::ClientCertFiles {
            cert_file: "/etc/containerd/certs.d/docker.io/cachalot-client.crt".into(),
            key_file: "/etc/containerd/certs.d/docker.io/cachalot-client.key".into(),
        });
        let text = render_hosts_toml("ns/m", &r, &r.endpoints.clone(), None).unwrap();
        assert!(
            text.contains(
                "client = [[\"/etc/containerd/certs.d/docker.io/cachalot-client.crt\", \
                 \"/etc/containerd/certs.d/docker.io/cachalot-client.key\"]]"
            ),
            "{text}"
        );
        let table: Table = text.parse().unwrap();
        for host in ["https://a:5000", "https://b:5000"] {
            let client = table["host"][host]["client"].as_array().unwrap();
            assert_eq!(client.len(), 1);
            assert_eq!(
                client[0].as_array().unwrap()[1].as_str(),
                Some("/etc/containerd/certs.d/docker.io/cachalot-client.key")
            );
        }
        // The upstream fallback host never gets the mirror's credential.
        assert!(table.get("client").is_none());

        // Never: the mirror is also `server`, so the top level presents it too.
        r.fallback = Fallback::Never;
        let table: Table = render_hosts_toml("ns/m", &r, &[], None)
            .unwrap()
            .parse()
            .unwrap();
        assert!(table["client"].is_array());

        r.client_cert = None;
        let text = render_hosts_toml("ns/m", &r, &r.endpoints.clone(), None).unwrap();
        assert!(!text.contains("client"), "{text}");
    }

    #[test]
    fn pem_files_start_with_the_marker_and_only_the_key_is_private() {
        let key = "-----BEGIN PRIVATE KEY-----\nabc\n-----END PRIVATE KEY-----\n\n";
        let text = render_pem_file("ns/m", key);
        assert_eq!(parse_marker(&text).unwrap().mirror, "ns/m");
        assert!(text.ends_with("-----END PRIVATE KEY-----\n"), "{text}");
        assert!(is_private_file(CLIENT_KEY_FILE_NAME));
        assert!(!is_private_file(CLIENT_CERT_FILE_NAME));
        assert!(!is_private_file(CA_FILE_NAME));
        assert!(!is_private_file(HOSTS_FILE_NAME));
    }
}
