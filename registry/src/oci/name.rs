//! Repository names, tags and references, validated against the distribution-spec grammar.
//!
//! A repository name becomes a directory path in the store, so the grammar is enforced strictly:
//! lowercase path components separated by single `/`, each `[a-z0-9]+` joined by `.`, `_`, `__` or
//! runs of `-`. That grammar already excludes `..`, empty components and absolute paths.
//!
//! [`ImageRef`] parses an image reference as users write it (`nginx:stable`,
//! `ghcr.io/org/app@sha256:…`), with Docker's defaults: no registry host means `docker.io`, a
//! one-component Docker Hub name gets `library/`, no tag means `latest`.

use std::borrow::Cow;
use std::fmt;
use std::str::FromStr;

use super::digest::Digest;

/// The longest repository name accepted (the distribution spec's limit).
pub const MAX_NAME_LEN: usize = 255;

/// A validated repository name such as `library/alpine`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RepositoryName(String);

/// A validated tag such as `3.19` or `latest`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Tag(String);

/// A manifest reference: a tag or a digest.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Reference {
    Tag(Tag),
    Digest(Digest),
}

/// Why a name, tag or reference was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseNameError {
    #[error("repository name is empty")]
    Empty,
    #[error("repository name is longer than {MAX_NAME_LEN} characters")]
    TooLong,
    #[error("repository name component `{0}` does not match [a-z0-9]+((\\.|_|__|-+)[a-z0-9]+)*")]
    BadComponent(String),
    #[error("tag `{0}` does not match [a-zA-Z0-9_][a-zA-Z0-9._-]{{0,127}}")]
    BadTag(String),
    #[error("invalid digest: {0}")]
    BadDigest(#[from] super::digest::ParseDigestError),
}

/// Docker Hub's implicit namespace: on `docker.io` a one-component name (`nginx`) means
/// `library/nginx`; other registries take names as given. Works on any `/`-separated text, so
/// configured glob patterns (`redis*`) are normalised exactly like requested names.
pub fn normalise_repository<'a>(registry: &str, name: &'a str) -> Cow<'a, str> {
    if registry == crate::config::DOCKER_HUB && !name.contains('/') {
        Cow::Owned(format!("library/{name}"))
    } else {
        Cow::Borrowed(name)
    }
}

fn is_alnum(b: u8) -> bool {
    b.is_ascii_lowercase() || b.is_ascii_digit()
}

/// One path component: alphanumeric runs joined by `.`, `_`, `__` or one or more `-`.
fn valid_component(c: &str) -> bool {
    let bytes = c.as_bytes();
    let (Some(&first), Some(&last)) = (bytes.first(), bytes.last()) else {
        return false;
    };
    if !is_alnum(first) || !is_alnum(last) {
        return false;
    }
    let mut i = 0;
    while i < bytes.len() {
        if is_alnum(bytes[i]) {
            i += 1;
            continue;
        }
        // A separator run: `.`, `_`, `__` or `-+`, always followed by an alphanumeric (checked by
        // the `last` test above and the next iteration).
        let sep_start = i;
        match bytes[i] {
            b'.' => i += 1,
            b'_' => {
                i += 1;
                if bytes.get(i) == Some(&b'_') {
                    i += 1;
                }
            }
            b'-' => {
                while bytes.get(i) == Some(&b'-') {
                    i += 1;
                }
            }
            _ => return false,
        }
        if !bytes.get(i).copied().is_some_and(is_alnum) || i == sep_start {
            return false;
        }
    }
    true
}

impl RepositoryName {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The name as `registry` knows it: on Docker Hub a one-component name gets `library/`.
    pub fn normalised_for(&self, registry: &str) -> RepositoryName {
        RepositoryName(normalise_repository(registry, &self.0).into_owned())
    }

    /// The path components, each safe as a directory name.
    pub fn components(&self) -> impl Iterator<Item = &str> {
        self.0.split('/')
    }
}

impl FromStr for RepositoryName {
    type Err = ParseNameError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.is_empty() {
            return Err(ParseNameError::Empty);
        }
        if s.len() > MAX_NAME_LEN {
            return Err(ParseNameError::TooLong);
        }
        if let Some(bad) = s.split('/').find(|c| !valid_component(c)) {
            let shown: String = bad.chars().take(64).collect();
            return Err(ParseNameError::BadComponent(shown));
        }
        Ok(RepositoryName(s.to_owned()))
    }
}

impl fmt::Display for RepositoryName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Tag {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for Tag {
    type Err = ParseNameError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bytes = s.as_bytes();
        let ok = matches!(bytes.first(), Some(b) if b.is_ascii_alphanumeric() || *b == b'_')
            && bytes.len() <= 128
            && bytes
                .iter()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
        if ok {
            Ok(Tag(s.to_owned()))
        } else {
            Err(ParseNameError::BadTag(s.chars().take(64).collect()))
        }
    }
}

impl fmt::Display for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for Reference {
    type Err = ParseNameError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.contains(':') {
            Ok(Reference::Digest(s.parse()?))
        } else {
            Ok(Reference::Tag(s.parse()?))
        }
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reference::Tag(t) => t.fmt(f),
            Reference::Digest(d) => d.fmt(f),
        }
    }
}

/// An image reference as users write it, resolved to the mirrored registry, the repository as
/// that registry knows it, and a tag or digest.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ImageRef {
    /// The registry host as configured (`docker.io`, `ghcr.io`, `registry.local:5000`).
    pub registry: String,
    pub repository: RepositoryName,
    pub reference: Reference,
}

/// Why an image reference was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseImageRefError {
    #[error("image reference is empty")]
    Empty,
    #[error("`{text}` is not an image reference: {source}")]
    Invalid {
        text: String,
        #[source]
        source: ParseNameError,
    },
}

impl FromStr for ImageRef {
    type Err = ParseImageRefError;

    /// Splits like containerd and the docker CLI: a first component with a `.` or `:`, or
    /// `localhost`, is the registry host; a `:` after the last `/` starts the tag; `@` starts a
    /// digest (which wins over a tag written before it).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let text = s.trim();
        if text.is_empty() {
            return Err(ParseImageRefError::Empty);
        }
        let invalid = |source| ParseImageRefError::Invalid {
            text: text.chars().take(128).collect(),
            source,
        };
        let (name, digest) = match text.split_once('@') {
            Some((n, d)) => (n, Some(d)),
            None => (text, None),
        };
        let (name, tag) = match name.rfind(':') {
            Some(i) if !name[i..].contains('/') => (&name[..i], Some(&name[i + 1..])),
            _ => (name, None),
        };
        let (registry, path) = match name.split_once('/') {
            Some((first, rest))
                if first.contains('.') || first.contains(':') || first == "localhost" =>
            {
                (first, rest)
            }
            _ => (crate::config::DOCKER_HUB, name),
        };
        let registry = if registry == "index.docker.io" {
            crate::config::DOCKER_HUB
        } else {
            registry
        };
        let repository = normalise_repository(registry, path)
            .parse::<RepositoryName>()
            .map_err(invalid)?;
        let reference = match (digest, tag) {
            (Some(d), _) => Reference::Digest(
                d.parse()
                    .map_err(|e| invalid(ParseNameError::BadDigest(e)))?,
            ),
            (None, Some(t)) => Reference::Tag(t.parse().map_err(invalid)?),
            (None, None) => Reference::Tag(Tag("latest".to_owned())),
        };
        Ok(ImageRef {
            registry: registry.to_owned(),
            repository,
            reference,
        })
    }
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sep = match self.reference {
            Reference::Tag(_) => ':',
            Reference::Digest(_) => '@',
        };
        write!(
            f,
            "{}/{}{sep}{}",
            self.registry, self.repository, self.reference
        )
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn names_from_the_distribution_grammar_are_accepted() {
        for ok in [
            "alpine",
            "library/alpine",
            "a/b/c",
            "my-org/my__image",
            "x.y/z_z",
            "a--b",
            "0",
        ] {
            assert!(ok.parse::<RepositoryName>().is_ok(), "{ok}");
        }
    }

    #[test]
    fn names_outside_the_grammar_or_escaping_the_store_are_refused() {
        for bad in [
            "", "..", "a/../b", "/abs", "a//b", "a/", "Upper", "a___b", "-a", "a.", "a..b", "a b",
            "a/./b",
        ] {
            assert!(bad.parse::<RepositoryName>().is_err(), "{bad:?}");
        }
        let long = "a".repeat(MAX_NAME_LEN + 1);
        assert_eq!(long.parse::<RepositoryName>(), Err(ParseNameError::TooLong));
    }

    #[test]
    fn one_segment_names_get_the_library_prefix() {
        let n: RepositoryName = "nginx".parse().unwrap();
        assert_eq!(n.normalised_for("docker.io").as_str(), "library/nginx");
        assert_eq!(n.normalised_for("quay.io").as_str(), "nginx");
        let n: RepositoryName = "org/nginx".parse().unwrap();
        assert_eq!(n.normalised_for("docker.io").as_str(), "org/nginx");
        assert_eq!(
            normalise_repository("docker.io", "redis*"),
            "library/redis*"
        );
        assert_eq!(normalise_repository("docker.io", "myteam/*"), "myteam/*");
    }

    #[test]
    fn tags_follow_the_grammar() {
        assert!("v1.2.3-rc_1".parse::<Tag>().is_ok());
        assert!("_x".parse::<Tag>().is_ok());
        assert!(".hidden".parse::<Tag>().is_err());
        assert!("a/b".parse::<Tag>().is_err());
        assert!("t".repeat(129).parse::<Tag>().is_err());
    }

    #[test]
    fn references_with_a_colon_are_digests() {
        let d = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
        assert!(matches!(d.parse::<Reference>(), Ok(Reference::Digest(_))));
        assert!(matches!(
            "latest".parse::<Reference>(),
            Ok(Reference::Tag(_))
        ));
        assert!("md5:00".parse::<Reference>().is_err());
    }

    #[test]
    fn image_references_get_docker_defaults_and_keep_explicit_hosts() {
        let r: ImageRef = "nginx".parse().unwrap();
        assert_eq!(r.to_string(), "docker.io/library/nginx:latest");
        let r: ImageRef = "nginx:stable".parse().unwrap();
        assert_eq!(
            (
                r.registry.as_str(),
                r.repository.as_str(),
                r.reference.to_string().as_str()
            ),
            ("docker.io", "library/nginx", "stable")
        );
        let r: ImageRef = "bitnami/redis:7".parse().unwrap();
        assert_eq!(r.to_string(), "docker.io/bitnami/redis:7");
        let r: ImageRef = "index.docker.io/redis".parse().unwrap();
        assert_eq!(r.to_string(), "docker.io/library/redis:latest");
        let d = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
        let r: ImageRef = format!("ghcr.io/org/app@{d}").parse().unwrap();
        assert_eq!(r.registry, "ghcr.io");
        assert_eq!(r.repository.as_str(), "org/app");
        assert!(matches!(r.reference, Reference::Digest(_)));
        let r: ImageRef = format!("ghcr.io/org/app:1.0@{d}").parse().unwrap();
        assert_eq!(r.to_string(), format!("ghcr.io/org/app@{d}"));
        let r: ImageRef = "localhost:5000/team/app:v2".parse().unwrap();
        assert_eq!(r.registry, "localhost:5000");
        assert_eq!(r.repository.as_str(), "team/app");
        let r: ImageRef = "localhost/app".parse().unwrap();
        assert_eq!(r.registry, "localhost");
    }

    #[test]
    fn malformed_image_references_are_refused_with_the_reason() {
        assert_eq!("  ".parse::<ImageRef>(), Err(ParseImageRefError::Empty));
        for bad in ["Nginx", "nginx:", "nginx@sha256:zz", "ghcr.io/", "a//b:1"] {
            let e = bad.parse::<ImageRef>().unwrap_err();
            assert!(
                e.to_string().contains("is not an image reference"),
                "{bad}: {e}"
            );
        }
    }
}
