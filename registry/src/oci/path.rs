//! The request path of the distribution API, parsed once into a typed [`Route`].
//!
//! Parsing happens on the raw (still percent-encoded) path: the name and reference grammars admit
//! no `%`, so an encoded `..` or `/` can never sneak through a decoding step.

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
