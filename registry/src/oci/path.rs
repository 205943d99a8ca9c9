//! The request path of the distribution API, parsed once into a typed [`Route`].
//!
//! Parsing happens on the raw (still percent-encoded) path: the name and reference grammars admit
//! no `%`, so an encoded `..` or `/` can never sneak through a decoding step.
//!
//! [`Addressed::parse`] adds path-prefix routing (`/v2/<registry>/<repository>/...`) for clients
//! that cannot send `ns`. The one rule for a path readable both ways:
//! - `ns` in the query wins: the whole path is the repository name, never a prefix;
//! - otherwise the first name component is a registry prefix when it looks like a registry host
//!   (contains `.` or `:`, or is `localhost`, as in docker's reference grammar) and at least one
//!   repository component follows it; such a prefix must be a well-formed `host[:port]` (else 400
//!   `NAME_INVALID`) and a configured registry (else 404 `NAME_UNKNOWN`, decided here, before any
//!   upstream is chosen);
//! - anything else is a repository of the default registry, as before.

use http::StatusCode;

use super::digest::Digest;
use super::error::{ErrorCode, OciError};
use super::name::{ParseNameError, Reference, RepositoryName};

/// What a request is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// `/v2/`: the API version check.
    Base,
    /// `/v2/_catalog`.
    Catalog,
    /// `/v2/<name>/tags/list`.
    Tags { name: RepositoryName },
    /// `/v2/<name>/manifests/<reference>`.
    Manifest {
        name: RepositoryName,
        reference: Reference,
    },
    /// `/v2/<name>/blobs/<digest>`.
    Blob {
        name: RepositoryName,
        digest: Digest,
    },
    /// `/v2/<name>/blobs/uploads/...`: push endpoints, always refused.
    Upload,
}

/// The kind of content a request touches, for metrics (a bounded label).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Manifest,
    Blob,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Manifest => "manifest",
            Kind::Blob => "blob",
        }
    }
}

/// Why a path was refused; converts to the matching OCI error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    #[error("no such endpoint")]
    NotFound,
    #[error("invalid repository name: {0}")]
    Name(ParseNameError),
    #[error("invalid reference: {0}")]
    Reference(ParseNameError),
    #[error("invalid digest: {0}")]
    Digest(super::digest::ParseDigestError),
}

impl From<RouteError> for OciError {
    fn from(e: RouteError) -> Self {
        let (status, code) = match &e {
            RouteError::NotFound => (StatusCode::NOT_FOUND, ErrorCode::Unsupported),
            RouteError::Name(_) => (StatusCode::BAD_REQUEST, ErrorCode::NameInvalid),
            RouteError::Reference(ParseNameError::BadDigest(_)) | RouteError::Digest(_) => {
                (StatusCode::BAD_REQUEST, ErrorCode::DigestInvalid)
            }
            RouteError::Reference(_) => (StatusCode::BAD_REQUEST, ErrorCode::ManifestInvalid),
        };
        OciError::new(status, code, e.to_string())
    }
}

/// A request addressed to one registry: by `ns`, by a path prefix, or (neither) the default.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Addressed {
    /// The registry named by the path prefix, when the path carries one.
    pub prefix: Option<String>,
    /// The request, with the prefix (if any) taken off the repository name.
    pub route: Route,
}

/// Why a first path component that looks like a registry host was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddressError {
    #[error(transparent)]
    Route(#[from] RouteError),
    #[error("malformed registry prefix `{0}`: expected host[:port]")]
    MalformedPrefix(String),
    #[error("registry `{prefix}` is not mirrored here (mirrored: {allowed})")]
    UnknownRegistry { prefix: String, allowed: String },
}

impl From<AddressError> for OciError {
    fn from(e: AddressError) -> Self {
        match e {
            AddressError::Route(e) => e.into(),
            AddressError::MalformedPrefix(_) => OciError::new(
                StatusCode::BAD_REQUEST,
                ErrorCode::NameInvalid,
                e.to_string(),
            ),
            AddressError::UnknownRegistry { .. } => {
                OciError::new(StatusCode::NOT_FOUND, ErrorCode::NameUnknown, e.to_string())
            }
        }
    }
}

/// Whether a first path component reads as a registry host rather than a repository component
/// (docker's reference rule: a `.` or a `:`, or exactly `localhost`).
pub fn looks_like_registry(component: &str) -> bool {
    component.contains('.') || component.contains(':') || component == "localhost"
}

/// Whether `s` is `host[:port]`: dot-separated DNS labels (letters, digits, inner `-`) and an
/// optional decimal port 1-65535. IPv6 literals are not accepted as prefixes.
pub fn valid_registry_host(s: &str) -> bool {
    let (host, port) = match s.split_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (s, None),
    };
    let label_ok = |l: &str| {
        let b = l.as_bytes();
        !b.is_empty()
            && b.len() <= 63
            && b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'-')
            && b[0] != b'-'
            && b[b.len() - 1] != b'-'
    };
    let port_ok = port.is_none_or(|p| {
        !p.is_empty()
            && p.len() <= 5
            && p.bytes().all(|c| c.is_ascii_digit())
            && p.parse::<u32>().is_ok_and(|n| (1..=65535).contains(&n))
    });
    host.len() <= 253 && host.split('.').all(label_ok) && port_ok
}

impl Addressed {
    /// Parses a request path under the rule of this module's header. `has_ns` says whether the
    /// query names the registry; `is_registry` says whether a name is a configured registry and
    /// `allowed` lists them for the error message.
    pub fn parse(
        path: &str,
        has_ns: bool,
        is_registry: impl Fn(&str) -> bool,
        allowed: impl FnOnce() -> String,
    ) -> Result<Addressed, AddressError> {
        let unprefixed = |path: &str| -> Result<Addressed, AddressError> {
            Ok(Addressed {
                prefix: None,
                route: Route::parse(path)?,
            })
        };
        if has_ns {
            return unprefixed(path);
        }
        let Some((first, tail)) = path
            .strip_prefix("/v2/")
            .and_then(|rest| rest.split_once('/'))
        else {
            return unprefixed(path);
        };
        if !looks_like_registry(first) {
            return unprefixed(path);
        }
        let route = match Route::parse(&format!("/v2/{tail}")) {
            Ok(route @ (Route::Tags { .. } | Route::Manifest { .. } | Route::Blob { .. })) => route,
            Ok(Route::Upload) => Route::Upload,
            // Nothing after the host names a repository (`/v2/x.y/manifests/1`, `/v2/x.y/_catalog`):
            // the host-like component is read as a repository name, as without this rule.
            Ok(Route::Base | Route::Catalog) | Err(RouteError::NotFound) => {
                return unprefixed(path)
            }
            Err(e) => return Err(e.into()),
        };
        if !valid_registry_host(first) {
            return Err(AddressError::MalformedPrefix(
                first.chars().take(64).collect(),
            ));
        }
        if !is_registry(first) {
            return Err(AddressError::UnknownRegistry {
                prefix: first.to_owned(),
                allowed: allowed(),
            });
        }
        Ok(Addressed {
            prefix: Some(first.to_owned()),
            route,
        })
    }
}

fn name_of(segments: &[&str]) -> Result<RepositoryName, RouteError> {
    segments.join("/").parse().map_err(RouteError::Name)
}

impl Route {
    /// Parses the path of a request (without the query string).
    pub fn parse(path: &str) -> Result<Route, RouteError> {
        let rest = match path.strip_prefix("/v2") {
            Some("") | Some("/") => return Ok(Route::Base),
            Some(rest) => rest.strip_prefix('/').ok_or(RouteError::NotFound)?,
            None => return Err(RouteError::NotFound),
        };
        if rest == "_catalog" {
            return Ok(Route::Catalog);
        }
        let segments: Vec<&str> = rest.split('/').collect();
        let n = segments.len();
        if n >= 3 && segments[n - 2] == "tags" && segments[n - 1] == "list" {
            return Ok(Route::Tags {
                name: name_of(&segments[..n - 2])?,
            });
        }
        if let Some(pos) = segments.iter().rposition(|s| *s == "uploads") {
            if pos >= 2 && segments[pos - 1] == "blobs" && n - pos <= 2 {
                return Ok(Route::Upload);
            }
        }
        if n >= 3 && segments[n - 2] == "manifests" {
            let name = name_of(&segments[..n - 2])?;
            let reference = segments[n - 1].parse().map_err(RouteError::Reference)?;
            return Ok(Route::Manifest { name, reference });
        }
        if n >= 3 && segments[n - 2] == "blobs" {
            let name = name_of(&segments[..n - 2])?;
            let digest = segments[n - 1].parse().map_err(RouteError::Digest)?;
            return Ok(Route::Blob { name, digest });
        }
        Err(RouteError::NotFound)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]
    use super::*;

    const D: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn api_paths_parse_into_routes() {
        assert_eq!(Route::parse("/v2/").unwrap(), Route::Base);
        assert_eq!(Route::parse("/v2").unwrap(), Route::Base);
        assert_eq!(Route::parse("/v2/_catalog").unwrap(), Route::Catalog);
        let Route::Tags { name } = Route::parse("/v2/library/alpine/tags/list").unwrap() else {
            panic!("not tags")
        };
        assert_eq!(name.as_str(), "library/alpine");
        let Route::Manifest { name, reference } =
            Route::parse("/v2/a/b/c/manifests/latest").unwrap()
        else {
            panic!("not a manifest")
        };
        assert_eq!(name.as_str(), "a/b/c");
        assert_eq!(reference.to_string(), "latest");
        let Route::Blob { name, digest } = Route::parse(&format!("/v2/alpine/blobs/{D}")).unwrap()
        else {
            panic!("not a blob")
        };
        assert_eq!(name.as_str(), "alpine");
        assert_eq!(digest.to_string(), D);
    }

    #[test]
    fn repositories_named_like_api_words_still_parse() {
        let Route::Manifest { name, .. } = Route::parse("/v2/blobs/manifests/manifests/x").unwrap()
        else {
            panic!("not a manifest")
        };
        assert_eq!(name.as_str(), "blobs/manifests");
    }

    #[test]
    fn upload_paths_are_recognised_for_refusal() {
        assert_eq!(Route::parse("/v2/a/blobs/uploads/").unwrap(), Route::Upload);
        assert_eq!(
            Route::parse("/v2/a/blobs/uploads/abc").unwrap(),
            Route::Upload
        );
    }

    fn addressed(path: &str, has_ns: bool) -> Result<Addressed, AddressError> {
        Addressed::parse(
            path,
            has_ns,
            |r| ["docker.io", "ghcr.io", "127.0.0.1:5000", "localhost"].contains(&r),
            || "docker.io, ghcr.io".to_owned(),
        )
    }

    fn prefixed(path: &str) -> (Option<String>, String) {
        let a = addressed(path, false).unwrap();
        let name = match a.route {
            Route::Manifest { name, .. } | Route::Blob { name, .. } | Route::Tags { name } => {
                name.to_string()
            }
            other => panic!("no name in {other:?}"),
        };
        (a.prefix, name)
    }

    #[test]
    fn a_configured_registry_host_as_first_component_is_a_prefix() {
        let p = |s: &str| Some(s.to_owned());
        assert_eq!(
            prefixed("/v2/docker.io/library/alpine/manifests/3.19"),
            (p("docker.io"), "library/alpine".into())
        );
        assert_eq!(
            prefixed(&format!("/v2/ghcr.io/org/app/blobs/{D}")),
            (p("ghcr.io"), "org/app".into())
        );
        assert_eq!(
            prefixed("/v2/127.0.0.1:5000/team/app/tags/list"),
            (p("127.0.0.1:5000"), "team/app".into())
        );
        assert_eq!(
            prefixed("/v2/localhost/app/manifests/1"),
            (p("localhost"), "app".into())
        );
        // Docker Hub's one-component names stay one component here; the handler adds `library/`.
        assert_eq!(
            prefixed("/v2/docker.io/alpine/manifests/1"),
            (p("docker.io"), "alpine".into())
        );
        assert_eq!(
            addressed("/v2/docker.io/a/blobs/uploads/", false)
                .unwrap()
                .route,
            Route::Upload
        );
    }

    #[test]
    fn names_without_a_host_like_first_component_are_the_default_registry() {
        assert_eq!(
            prefixed("/v2/library/alpine/manifests/1"),
            (None, "library/alpine".into())
        );
        // `localhost` only counts exactly; `localhostx` or `docker-io` are repository components.
        assert_eq!(
            prefixed("/v2/localhostx/app/manifests/1"),
            (None, "localhostx/app".into())
        );
        assert_eq!(
            prefixed("/v2/docker-io/app/manifests/1"),
            (None, "docker-io/app".into())
        );
    }

    #[test]
    fn a_host_like_component_with_nothing_after_it_is_a_repository_name() {
        assert_eq!(
            prefixed("/v2/docker.io/manifests/1"),
            (None, "docker.io".into())
        );
        assert_eq!(prefixed("/v2/x.y/tags/list"), (None, "x.y".into()));
        assert_eq!(
            addressed("/v2/_catalog", false).unwrap().route,
            Route::Catalog
        );
        assert_eq!(
            addressed("/v2/docker.io/_catalog", false),
            Err(AddressError::Route(RouteError::NotFound))
        );
    }

    #[test]
    fn ns_wins_over_a_host_like_first_component() {
        let a = addressed("/v2/docker.io/library/alpine/manifests/1", true).unwrap();
        assert_eq!(a.prefix, None);
        let Route::Manifest { name, .. } = a.route else {
            panic!("not a manifest")
        };
        assert_eq!(name.as_str(), "docker.io/library/alpine");
        // With ns, a `:` in the name is simply an invalid repository name.
        assert!(matches!(
            addressed("/v2/127.0.0.1:5000/a/manifests/1", true),
            Err(AddressError::Route(RouteError::Name(_)))
        ));
    }

    #[test]
    fn a_host_like_prefix_not_configured_is_unknown_and_a_malformed_one_invalid() {
        assert!(matches!(
            addressed("/v2/quay.io/org/app/manifests/1", false),
            Err(AddressError::UnknownRegistry { prefix, .. }) if prefix == "quay.io"
        ));
        // A dotted first component of a default-registry repository reads as a host too: the
        // price of the rule (send `ns` to reach such a repository).
        assert!(matches!(
            addressed("/v2/x.y/z/manifests/1", false),
            Err(AddressError::UnknownRegistry { .. })
        ));
        for bad in [
            "/v2/a..b/z/manifests/1",
            "/v2/-x.io/z/manifests/1",
            "/v2/x.io:/z/manifests/1",
            "/v2/x.io:99999/z/manifests/1",
            "/v2/x.io:5000:1/z/manifests/1",
            "/v2/x_y.io/z/manifests/1",
        ] {
            assert!(
                matches!(addressed(bad, false), Err(AddressError::MalformedPrefix(_))),
                "{bad}: {:?}",
                addressed(bad, false)
            );
        }
        let e: OciError = addressed("/v2/a..b/z/manifests/1", false)
            .unwrap_err()
            .into();
        assert_eq!(
            (e.status, e.code),
            (StatusCode::BAD_REQUEST, ErrorCode::NameInvalid)
        );
        let e: OciError = addressed("/v2/quay.io/z/manifests/1", false)
            .unwrap_err()
            .into();
        assert_eq!(
            (e.status, e.code),
            (StatusCode::NOT_FOUND, ErrorCode::NameUnknown)
        );
    }

    #[test]
    fn the_rest_after_a_prefix_is_validated_like_any_name() {
        assert!(matches!(
            addressed("/v2/docker.io/../x/manifests/1", false),
            Err(AddressError::Route(RouteError::Name(_)))
        ));
        assert!(matches!(
            addressed("/v2/x%2eio/z/manifests/1", false),
            Err(AddressError::Route(RouteError::Name(_)))
        ));
        assert!(matches!(
            addressed("/v2/docker.io/a/blobs/md5:0", false),
            Err(AddressError::Route(RouteError::Digest(_)))
        ));
    }

    #[test]
    fn hostile_paths_are_refused_with_the_right_error() {
        assert!(matches!(
            Route::parse("/v2/../etc/manifests/latest"),
            Err(RouteError::Name(_))
        ));
        assert!(matches!(
            Route::parse("/v2/%2e%2e/manifests/latest"),
            Err(RouteError::Name(_))
        ));
        assert!(matches!(
            Route::parse("/v2/a/blobs/sha256:abc"),
            Err(RouteError::Digest(_))
        ));
        assert!(matches!(
            Route::parse("/v2/a/blobs/md5:abc"),
            Err(RouteError::Digest(_))
        ));
        assert!(matches!(
            Route::parse("/v2/a/manifests/bad/tag"),
            Err(RouteError::Name(_)) | Err(RouteError::NotFound)
        ));
        assert!(matches!(
            Route::parse("/v2/a/manifests/-x"),
            Err(RouteError::Reference(_))
        ));
        assert_eq!(Route::parse("/etc/passwd"), Err(RouteError::NotFound));
        assert_eq!(Route::parse("/v2/a"), Err(RouteError::NotFound));
        assert_eq!(
            Route::parse("/v2x/a/manifests/x"),
            Err(RouteError::NotFound)
        );
    }
}
