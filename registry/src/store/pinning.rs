//! Configured pins: content that eviction never removes, named by `REPOSITORY[:TAG]` patterns.
//!
//! A pattern globs over the repository and, after `:`, the tag (`library/nginx:stable`,
//! `library/redis:*`, `myteam/*`; no tag means every tag). `*` matches any run of characters,
//! `/` included, and `?` one character. On `docker.io` a one-component repository gets
//! `library/` exactly as requested names do (`redis:7` pins `library/redis:7`). An exact
//! `REPOSITORY@DIGEST` (no globs) pins that manifest whether or not a tag still points at it;
//! manifests are stored by digest alone, so the repository part is checked but not matched.
//!
//! What a pin protects is computed at eviction time, from the store itself: every cached tag
//! whose repository and tag match a pattern names a manifest; an image index or manifest list
//! protects those of its child manifests that are cached; an image manifest protects its config
//! and layer blobs. A manifest of a media type not understood here protects only itself. The walk
//! is a pure function of the tag records and a manifest reader ([`protected_content`]), so it is
//! tested without a disk.
//!
//! Pins come from configuration (`registries.<name>.pin`) and from the pin file (`pinFile`, see
//! `pin_file`), which the operator fills with the images running Pods use; [`PinRules::merge`]
//! joins the two at each eviction pass.

use std::collections::{BTreeMap, BTreeSet};

use globset::{Glob, GlobMatcher};
use serde::Deserialize;

use crate::config::{Config, ConfigError};
use crate::oci::name::normalise_repository;
use crate::oci::{media, Digest};

/// How deep an index may nest (index → index → manifest is legal OCI). Bounds the walk over
/// hostile or cyclic-looking content; real images use one or two levels.
pub const MAX_DEPTH: usize = 4;

/// Why a pin pattern was refused. Each variant shows the pattern as written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParsePinError {
    #[error("`{0}`: the repository part is empty (expected REPOSITORY[:TAG])")]
    EmptyRepository(String),
    #[error("`{0}`: the tag part after `:` is empty (leave out `:` to pin every tag)")]
    EmptyTag(String),
    #[error(
        "`{0}`: a repository pattern uses lower-case letters, digits, `.`, `_`, `-`, `/` and the globs `*` and `?`"
    )]
    BadRepository(String),
    #[error(
        "`{0}`: a tag pattern has at most 128 letters, digits, `.`, `_`, `-` and the globs `*` and `?`"
    )]
    BadTag(String),
    #[error("`{0}`: the part after `@` is not a digest (expected REPOSITORY@sha256:HEX)")]
    BadDigest(String),
    #[error("`{pattern}`: {message}")]
    Glob { pattern: String, message: String },
}

/// One compiled `REPOSITORY[:TAG]` pattern of one registry.
#[derive(Debug, Clone)]
pub struct PinPattern {
    text: String,
    repository: GlobMatcher,
    tag: Option<GlobMatcher>,
}

fn is_glob(b: u8) -> bool {
    matches!(b, b'*' | b'?')
}

fn compile(pattern: &str, glob: &str) -> Result<GlobMatcher, ParsePinError> {
    Glob::new(glob)
        .map(|g| g.compile_matcher())
        .map_err(|e| ParsePinError::Glob {
            pattern: pattern.to_owned(),
            message: e.kind().to_string(),
        })
}

/// Whether `repository` is a plausible repository pattern (globs only when `globs`).
fn repository_ok(repository: &str, globs: bool) -> bool {
    repository.bytes().all(|b| {
        b.is_ascii_lowercase()
            || b.is_ascii_digit()
            || matches!(b, b'.' | b'_' | b'-' | b'/')
            || (globs && is_glob(b))
    }) && !repository.starts_with('/')
        && !repository.ends_with('/')
        && !repository.contains("//")
}

/// One entry of a pin list: a pattern over tags, or one manifest by digest.
#[derive(Debug, Clone)]
pub enum PinEntry {
    Pattern(PinPattern),
    Digest(Digest),
}

impl PinEntry {
    /// Parses `REPOSITORY[:TAG]` (globs allowed) or `REPOSITORY@DIGEST` (no globs) of `registry`.
    pub fn parse(text: &str, registry: &str) -> Result<PinEntry, ParsePinError> {
        let Some((repository, digest)) = text.split_once('@') else {
            return PinPattern::parse(text, registry).map(PinEntry::Pattern);
        };
        if repository.is_empty() {
            return Err(ParsePinError::EmptyRepository(text.to_owned()));
        }
        if !repository_ok(repository, false) {
            return Err(ParsePinError::BadRepository(text.to_owned()));
        }
        digest
            .parse()
            .map(PinEntry::Digest)
            .map_err(|_| ParsePinError::BadDigest(text.to_owned()))
    }
}

impl PinPattern {
    /// Parses a pattern of `registry`, normalising the repository as requests to it are.
    pub fn parse(text: &str, registry: &str) -> Result<PinPattern, ParsePinError> {
        let (repository, tag) = match text.split_once(':') {
            Some((r, t)) => (r, Some(t)),
            None => (text, None),
        };
        if repository.is_empty() {
            return Err(ParsePinError::EmptyRepository(text.to_owned()));
        }
        if !repository_ok(repository, true) {
            return Err(ParsePinError::BadRepository(text.to_owned()));
        }
        let tag = match tag {
            None => None,
            Some("") => return Err(ParsePinError::EmptyTag(text.to_owned())),
            Some(t) => {
                let ok = t.len() <= 128
                    && t.bytes().all(|b| {
                        b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-') || is_glob(b)
                    });
                if !ok {
                    return Err(ParsePinError::BadTag(text.to_owned()));
                }
                Some(compile(text, t)?)
            }
        };
        let repository = normalise_repository(registry, repository);
        Ok(PinPattern {
            text: text.to_owned(),
            repository: compile(text, &repository)?,
            tag,
        })
    }

    /// The pattern as configured.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Whether the pattern's repository part matches `repository` (already normalised).
    pub fn matches_repository(&self, repository: &str) -> bool {
        self.repository.is_match(repository)
    }

    /// Whether `repository:tag` is pinned by this pattern.
    pub fn matches(&self, repository: &str, tag: &str) -> bool {
        self.matches_repository(repository) && self.tag.as_ref().is_none_or(|t| t.is_match(tag))
    }
}

/// The pin patterns of every registry, and the manifests pinned by digest.
#[derive(Debug, Clone, Default)]
pub struct PinRules {
    by_registry: BTreeMap<String, Vec<PinPattern>>,
    /// Manifests pinned by digest. The store keeps manifests by digest alone, so these are
    /// roots of the protected-set walk whichever registry named them.
    digests: BTreeSet<Digest>,
}

impl PinRules {
    /// Compiles the `pin` lists of a config; the error names the field
    /// (`registries.docker.io.pin[1]`) like every other config error.
    pub fn from_config(config: &Config) -> Result<PinRules, ConfigError> {
        let mut rules = PinRules::default();
        for (name, registry) in &config.registries {
            for (i, text) in registry.pin.iter().enumerate() {
                rules.add(name, text).map_err(|e| ConfigError::Invalid {
                    field: format!("registries.{name}.pin[{i}]"),
                    message: e.to_string(),
                })?;
            }
        }
        Ok(rules)
    }

    /// Adds one pin list entry of `registry`.
    pub fn add(&mut self, registry: &str, text: &str) -> Result<(), ParsePinError> {
        match PinEntry::parse(text, registry)? {
            PinEntry::Pattern(p) => self
                .by_registry
                .entry(registry.to_owned())
                .or_default()
                .push(p),
            PinEntry::Digest(d) => {
                self.digests.insert(d);
            }
        }
        Ok(())
    }

    /// Adds every pin of `other` (configured pins and the pin file's, at one eviction pass).
    pub fn merge(&mut self, other: &PinRules) {
        for (registry, patterns) in &other.by_registry {
            self.by_registry
                .entry(registry.clone())
                .or_default()
                .extend(patterns.iter().cloned());
        }
        self.digests.extend(other.digests.iter().cloned());
    }

    /// True when nothing is pinned (eviction then skips the protected-set walk entirely).
    pub fn is_empty(&self) -> bool {
        self.by_registry.is_empty() && self.digests.is_empty()
    }

    /// Manifests pinned by digest.
    pub fn digests(&self) -> impl Iterator<Item = &Digest> {
        self.digests.iter()
    }

    /// How many entries the rules hold (patterns and digests).
    pub fn len(&self) -> usize {
        self.by_registry.values().map(Vec::len).sum::<usize>() + self.digests.len()
    }

    /// Registries with at least one pin.
    pub fn registries(&self) -> impl Iterator<Item = &str> {
        self.by_registry.keys().map(String::as_str)
    }

    /// Whether some pattern of `registry` could match tags of `repository`.
    pub fn covers_repository(&self, registry: &str, repository: &str) -> bool {
        self.by_registry
            .get(registry)
            .is_some_and(|ps| ps.iter().any(|p| p.matches_repository(repository)))
    }

    /// Whether `registry`'s `repository:tag` is pinned.
    pub fn is_pinned(&self, registry: &str, repository: &str, tag: &str) -> bool {
        self.by_registry
            .get(registry)
            .is_some_and(|ps| ps.iter().any(|p| p.matches(repository, tag)))
    }
}

/// Content that eviction must keep: manifests and blobs by digest.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Protected {
    pub manifests: BTreeSet<Digest>,
    pub blobs: BTreeSet<Digest>,
}

/// A cached manifest as the protected-set walk sees it.
#[derive(Debug, Clone)]
pub struct ManifestBytes {
    pub media_type: String,
    pub bytes: Vec<u8>,
}

/// The references of an index or image manifest; every other field is ignored, so both the OCI
/// and the Docker schema 2 shapes parse.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct References {
    manifests: Vec<Descriptor>,
    config: Option<Descriptor>,
    layers: Vec<Descriptor>,
}

#[derive(Debug, Deserialize)]
struct Descriptor {
    digest: String,
}

fn digests<'a>(descriptors: impl IntoIterator<Item = &'a Descriptor>) -> Vec<Digest> {
    // A descriptor with a digest this registry cannot parse cannot name cached content either.
    descriptors
        .into_iter()
        .filter_map(|d| d.digest.parse().ok())
        .collect()
}

/// Everything reachable from the pinned manifests `roots`: the roots themselves when cached,
/// the cached children of indexes and manifest lists, and the config and layers of image
/// manifests. `read` returns a cached manifest, or `None` when it is not in the store (a child
/// that was never requested, say); uncached manifests are not protected, and nothing below them.
pub fn protected_content(
    roots: impl IntoIterator<Item = Digest>,
    read: impl Fn(&Digest) -> Option<ManifestBytes>,
) -> Protected {
    let mut protected = Protected::default();
    let mut queue: Vec<(Digest, usize)> = roots.into_iter().map(|d| (d, 0)).collect();
    while let Some((digest, depth)) = queue.pop() {
        if protected.manifests.contains(&digest) {
            continue;
        }
        let Some(manifest) = read(&digest) else {
            continue;
        };
        protected.manifests.insert(digest);
        let is_index = matches!(
            manifest.media_type.as_str(),
            media::OCI_INDEX | media::DOCKER_MANIFEST_LIST
        );
        let is_image = matches!(
            manifest.media_type.as_str(),
            media::OCI_MANIFEST | media::DOCKER_MANIFEST_V2
        );
        if !is_index && !is_image {
            continue;
        }
        // Unparseable bytes of a known type: the manifest itself stays, its references are unknown.
        let Ok(refs) = serde_json::from_slice::<References>(&manifest.bytes) else {
            continue;
        };
        if is_index {
            if depth < MAX_DEPTH {
                queue.extend(digests(&refs.manifests).into_iter().map(|d| (d, depth + 1)));
            }
        } else {
            protected
                .blobs
                .extend(digests(refs.config.iter().chain(&refs.layers)));
        }
    }
    protected
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use std::collections::HashMap;

    fn pattern(text: &str) -> PinPattern {
        PinPattern::parse(text, "docker.io").unwrap()
    }

    #[test]
    fn patterns_match_repository_and_tag_globs() {
        let p = pattern("library/nginx:stable");
        assert!(p.matches("library/nginx", "stable"));
        assert!(!p.matches("library/nginx", "stable-alpine"));
        assert!(!p.matches("library/nginx2", "stable"));

        let p = pattern("library/redis:*");
        assert!(p.matches("library/redis", "7.2"));
        assert!(!p.matches("library/redis-stack", "7.2"));

        let p = pattern("myteam/*");
        assert!(p.matches("myteam/api", "v1"));
        assert!(p.matches("myteam/tools/ci", "latest"));
        assert!(!p.matches("otherteam/api", "v1"));

        let p = pattern("myteam/api:v1.?");
        assert!(p.matches("myteam/api", "v1.2"));
        assert!(!p.matches("myteam/api", "v1.10"));
    }

    #[test]
    fn one_component_patterns_on_docker_hub_get_the_library_prefix() {
        assert!(pattern("nginx:stable").matches("library/nginx", "stable"));
        assert!(pattern("redis*").matches("library/redis-stack", "7"));
        assert!(!pattern("redis*").matches("redis", "7"));
        let quay = PinPattern::parse("nginx:stable", "quay.io").unwrap();
        assert!(quay.matches("nginx", "stable"));
        assert!(!quay.matches("library/nginx", "stable"));
    }

    #[test]
    fn malformed_patterns_are_refused_with_the_pattern_named() {
        for (bad, expected) in [
            ("", ParsePinError::EmptyRepository(String::new())),
            (":latest", ParsePinError::EmptyRepository(":latest".into())),
            ("nginx:", ParsePinError::EmptyTag("nginx:".into())),
            ("Nginx", ParsePinError::BadRepository("Nginx".into())),
            ("/abs", ParsePinError::BadRepository("/abs".into())),
            ("a//b", ParsePinError::BadRepository("a//b".into())),
            (
                "nginx@sha256:00",
                ParsePinError::BadRepository("nginx@sha256:00".into()),
            ),
            ("nginx:a/b", ParsePinError::BadTag("nginx:a/b".into())),
            ("nginx:a:b", ParsePinError::BadTag("nginx:a:b".into())),
            ("nginx:[ab]", ParsePinError::BadTag("nginx:[ab]".into())),
        ] {
            assert_eq!(
                PinPattern::parse(bad, "docker.io").unwrap_err(),
                expected,
                "{bad:?}"
            );
        }
        let long = format!("nginx:{}", "t".repeat(129));
        assert!(matches!(
            PinPattern::parse(&long, "docker.io"),
            Err(ParsePinError::BadTag(_))
        ));
    }

    #[test]
    fn digest_entries_pin_one_manifest_and_refuse_globs_and_bad_digests() {
        let digest = digest_of("m");
        let mut rules = PinRules::default();
        rules
            .add("docker.io", &format!("library/nginx@{digest}"))
            .unwrap();
        assert_eq!(rules.digests().collect::<Vec<_>>(), [&digest]);
        assert_eq!(rules.registries().count(), 0, "a digest is no tag pattern");
        assert!(!rules.is_empty());
        assert_eq!(rules.len(), 1);
        for (bad, expected) in [
            (
                format!("library/*@{digest}"),
                ParsePinError::BadRepository(format!("library/*@{digest}")),
            ),
            (
                format!("@{digest}"),
                ParsePinError::EmptyRepository(format!("@{digest}")),
            ),
            (
                "nginx@sha256:00".to_owned(),
                ParsePinError::BadDigest("nginx@sha256:00".into()),
            ),
            (
                format!("nginx:1@{digest}"),
                ParsePinError::BadRepository(format!("nginx:1@{digest}")),
            ),
        ] {
            assert_eq!(rules.add("docker.io", &bad).unwrap_err(), expected, "{bad}");
        }
    }

    #[test]
    fn merged_rules_pin_what_either_side_pins() {
        let mut configured = PinRules::default();
        configured.add("docker.io", "nginx:stable").unwrap();
        let mut file = PinRules::default();
        file.add("docker.io", "redis:7").unwrap();
        file.add("quay.io", "team/app:v1").unwrap();
        file.add("quay.io", &format!("team/app@{}", digest_of("x")))
            .unwrap();
        configured.merge(&file);
        assert!(configured.is_pinned("docker.io", "library/nginx", "stable"));
        assert!(configured.is_pinned("docker.io", "library/redis", "7"));
        assert!(configured.is_pinned("quay.io", "team/app", "v1"));
        assert_eq!(configured.len(), 4);
        assert_eq!(configured.digests().count(), 1);
    }

    #[test]
    fn rules_are_per_registry() {
        let mut config = Config::default();
        config.registries.insert(
            "docker.io".into(),
            crate::config::RegistryConfig {
                pin: vec!["nginx:stable".into()],
                ..Default::default()
            },
        );
        config
            .registries
            .insert("quay.io".into(), Default::default());
        let rules = PinRules::from_config(&config).unwrap();
        assert!(rules.is_pinned("docker.io", "library/nginx", "stable"));
        assert!(!rules.is_pinned("quay.io", "library/nginx", "stable"));
        assert!(rules.covers_repository("docker.io", "library/nginx"));
        assert!(!rules.covers_repository("docker.io", "library/redis"));
        assert_eq!(rules.registries().collect::<Vec<_>>(), ["docker.io"]);
        assert!(PinRules::default().is_empty());
    }

    // ---- protected-set walk ----

    fn digest_of(text: &str) -> Digest {
        Digest::sha256_of(text.as_bytes())
    }

    /// A fake store: digest → manifest.
    #[derive(Default)]
    struct Manifests(HashMap<Digest, ManifestBytes>);

    impl Manifests {
        fn add(&mut self, media_type: &str, body: serde_json::Value) -> Digest {
            let bytes = serde_json::to_vec(&body).unwrap();
            let digest = Digest::sha256_of(&bytes);
            self.0.insert(
                digest.clone(),
                ManifestBytes {
                    media_type: media_type.into(),
                    bytes,
                },
            );
            digest
        }

        fn image(&mut self, media_type: &str, config: &Digest, layers: &[&Digest]) -> Digest {
            self.add(
                media_type,
                serde_json::json!({
                    "schemaVersion": 2,
                    "mediaType": media_type,
                    "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config.to_string(), "size": 1},
                    "layers": layers.iter().map(|l| serde_json::json!({"mediaType": "x", "digest": l.to_string(), "size": 1})).collect::<Vec<_>>(),
                }),
            )
        }

        fn index(&mut self, media_type: &str, children: &[&Digest]) -> Digest {
            self.add(
                media_type,
                serde_json::json!({
                    "schemaVersion": 2,
                    "mediaType": media_type,
                    "manifests": children.iter().map(|c| serde_json::json!({
                        "mediaType": media::OCI_MANIFEST, "digest": c.to_string(), "size": 1,
                        "platform": {"os": "linux", "architecture": "amd64"}
                    })).collect::<Vec<_>>(),
                }),
            )
        }

        fn walk(&self, roots: &[&Digest]) -> Protected {
            protected_content(roots.iter().map(|d| (*d).clone()), |d| {
                self.0.get(d).cloned()
            })
        }
    }

    fn set(ds: &[&Digest]) -> BTreeSet<Digest> {
        ds.iter().map(|d| (*d).clone()).collect()
    }

    #[test]
    fn a_plain_manifest_protects_itself_its_config_and_its_layers() {
        let (config, l1, l2) = (digest_of("c"), digest_of("l1"), digest_of("l2"));
        let mut m = Manifests::default();
        let image = m.image(media::DOCKER_MANIFEST_V2, &config, &[&l1, &l2]);
        let other = m.image(media::OCI_MANIFEST, &digest_of("c2"), &[&digest_of("l3")]);
        let p = m.walk(&[&image]);
        assert_eq!(p.manifests, set(&[&image]));
        assert_eq!(p.blobs, set(&[&config, &l1, &l2]));
        assert!(!p.manifests.contains(&other));
    }

    #[test]
    fn an_oci_index_protects_its_cached_children_and_their_blobs() {
        let mut m = Manifests::default();
        let amd = m.image(media::OCI_MANIFEST, &digest_of("ca"), &[&digest_of("la")]);
        let arm = m.image(media::OCI_MANIFEST, &digest_of("cb"), &[&digest_of("lb")]);
        let index = m.index(media::OCI_INDEX, &[&amd, &arm]);
        let p = m.walk(&[&index]);
        assert_eq!(p.manifests, set(&[&index, &amd, &arm]));
        assert_eq!(
            p.blobs,
            set(&[
                &digest_of("ca"),
                &digest_of("la"),
                &digest_of("cb"),
                &digest_of("lb")
            ])
        );
    }

    #[test]
    fn a_docker_manifest_list_protects_its_cached_children() {
        let mut m = Manifests::default();
        let child = m.image(
            media::DOCKER_MANIFEST_V2,
            &digest_of("c"),
            &[&digest_of("l")],
        );
        let list = m.index(media::DOCKER_MANIFEST_LIST, &[&child]);
        let p = m.walk(&[&list]);
        assert_eq!(p.manifests, set(&[&list, &child]));
        assert_eq!(p.blobs, set(&[&digest_of("c"), &digest_of("l")]));
    }

    #[test]
    fn a_child_missing_from_the_store_is_skipped_and_its_siblings_still_protected() {
        let mut m = Manifests::default();
        let present = m.image(media::OCI_MANIFEST, &digest_of("c"), &[&digest_of("l")]);
        let missing = digest_of("never fetched");
        let index = m.index(media::OCI_INDEX, &[&missing, &present]);
        let p = m.walk(&[&index]);
        assert_eq!(p.manifests, set(&[&index, &present]));
        assert_eq!(p.blobs, set(&[&digest_of("c"), &digest_of("l")]));
        // A pinned tag whose manifest is not cached (seen by HEAD only) protects nothing.
        assert_eq!(m.walk(&[&missing]), Protected::default());
    }

    #[test]
    fn unknown_media_types_and_unparseable_manifests_protect_only_themselves() {
        let mut m = Manifests::default();
        let artifact = m.add(
            "application/vnd.example.thing+json",
            serde_json::json!({"layers": [{"digest": digest_of("l").to_string()}]}),
        );
        let broken = digest_of("broken");
        m.0.insert(
            broken.clone(),
            ManifestBytes {
                media_type: media::OCI_MANIFEST.into(),
                bytes: b"not json".to_vec(),
            },
        );
        let p = m.walk(&[&artifact, &broken]);
        assert_eq!(p.manifests, set(&[&artifact, &broken]));
        assert!(p.blobs.is_empty());
    }

    #[test]
    fn nested_indexes_are_followed_to_a_bounded_depth() {
        let mut m = Manifests::default();
        let leaf = m.image(media::OCI_MANIFEST, &digest_of("c"), &[]);
        let mut top = leaf.clone();
        let mut chain = vec![leaf.clone()];
        for _ in 0..(MAX_DEPTH + 2) {
            top = m.index(media::OCI_INDEX, &[&top]);
            chain.push(top.clone());
        }
        let p = m.walk(&[&top]);
        // The root and MAX_DEPTH levels below it.
        assert_eq!(p.manifests.len(), MAX_DEPTH + 1);
        assert!(!p.manifests.contains(&leaf));
        let p = m.walk(&[&chain[MAX_DEPTH]]);
        assert!(p.manifests.contains(&leaf));
        assert!(p.blobs.contains(&digest_of("c")));
    }
}
