//! The pin file (`pinFile`): pins that change while the registry runs, re-read at every eviction
//! pass.
//!
//! The file is YAML, a map from registry name to a pin list in the syntax of
//! `registries.<name>.pin` (`library/nginx:stable`, `team/*`, `library/nginx@sha256:…`). The
//! operator writes it into a ConfigMap mounted into the registry Pod with the images running
//! Pods use; the kubelet replaces the file when the ConfigMap changes, and the next pass sees it.
//! No reload machinery is needed: a pass walks tag files anyway, and one more small read is cheap.
//!
//! Invariant: a bad file never makes eviction remove more. A missing file means no extra pins (it
//! was never written, or pinning workload images was switched off); an unreadable or invalid one
//! logs a warning and the last good set stays in force.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use super::pinning::{ParsePinError, PinRules};

/// Why the pin file could not be used. The last good pins stay in force.
#[derive(Debug, thiserror::Error)]
pub enum LoadPinFileError {
    #[error("cannot read pin file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// An empty file is what a half-written one looks like; "no pins" is written `{}`.
    #[error("pin file {path} is empty (write `{{}}` to pin nothing)")]
    Empty { path: PathBuf },
    #[error("pin file {path}: {source}")]
    Parse {
        path: PathBuf,
        source: serde_yaml::Error,
    },
    #[error("pin file {path}: {registry}[{index}]: {source}")]
    Pin {
        path: PathBuf,
        registry: String,
        index: usize,
        source: ParsePinError,
    },
}

/// Compiles the text of a pin file. An empty (or blank) file is refused, so a file caught while
/// an editor rewrites it in place keeps the last good pins; `{}` pins nothing.
pub fn parse(text: &str, path: &Path) -> Result<PinRules, LoadPinFileError> {
    if text.trim().is_empty() {
        return Err(LoadPinFileError::Empty {
            path: path.to_owned(),
        });
    }
    let lists: Option<BTreeMap<String, Vec<String>>> =
        serde_yaml::from_str(text).map_err(|source| LoadPinFileError::Parse {
            path: path.to_owned(),
            source,
        })?;
    let mut rules = PinRules::default();
    for (registry, pins) in lists.unwrap_or_default() {
        for (index, text) in pins.iter().enumerate() {
            rules
                .add(&registry, text)
                .map_err(|source| LoadPinFileError::Pin {
                    path: path.to_owned(),
                    registry: registry.clone(),
                    index,
                    source,
                })?;
        }
    }
    Ok(rules)
}

/// Reads and compiles the pin file; a missing file pins nothing.
pub fn load(path: &Path) -> Result<PinRules, LoadPinFileError> {
    match std::fs::read_to_string(path) {
        Ok(text) => parse(&text, path),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(PinRules::default()),
        Err(source) => Err(LoadPinFileError::Read {
            path: path.to_owned(),
            source,
        }),
    }
}

/// The pin file of a store and the last set read from it successfully.
#[derive(Debug)]
pub struct PinFile {
    path: PathBuf,
    last_good: Mutex<PinRules>,
}

impl PinFile {
    pub fn new(path: PathBuf) -> PinFile {
        PinFile {
            path,
            last_good: Mutex::new(PinRules::default()),
        }
    }

    /// Re-reads the file: its pins when it is good (or none when it is missing), else the last
    /// good ones with a warning.
    pub fn current(&self) -> PinRules {
        let loaded = load(&self.path);
        // A poisoned lock only means another pass panicked mid-update of a plain value.
        let mut last_good = self.last_good.lock().unwrap_or_else(|e| e.into_inner());
        match loaded {
            Ok(rules) => *last_good = rules,
            Err(error) => tracing::warn!(
                %error,
                kept_pins = last_good.len(),
                "pin file unusable; keeping the pins last read from it"
            ),
        }
        last_good.clone()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const DIGEST: &str = "sha256:0000000000000000000000000000000000000000000000000000000000000000";

    #[test]
    fn a_pin_file_maps_registries_to_pin_lists() {
        let text = format!(
            "docker.io:\n- library/nginx:stable\n- redis\n- library/nginx@{DIGEST}\nquay.io: [team/app:v1]\n"
        );
        let rules = parse(&text, Path::new("pins.yaml")).unwrap();
        assert!(rules.is_pinned("docker.io", "library/nginx", "stable"));
        assert!(rules.is_pinned("docker.io", "library/redis", "7"));
        assert!(rules.is_pinned("quay.io", "team/app", "v1"));
        assert!(!rules.is_pinned("quay.io", "library/nginx", "stable"));
        assert_eq!(
            rules.digests().map(ToString::to_string).collect::<Vec<_>>(),
            [DIGEST]
        );
        assert!(matches!(
            parse(" \n", Path::new("pins.yaml")),
            Err(LoadPinFileError::Empty { .. })
        ));
        assert!(parse("{}", Path::new("pins.yaml")).unwrap().is_empty());
    }

    #[test]
    fn a_bad_entry_names_the_file_registry_and_position() {
        let err = parse("docker.io: [nginx, 'Bad:1']", Path::new("pins.yaml")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "pin file pins.yaml: docker.io[1]: `Bad:1`: a repository pattern uses lower-case letters, digits, `.`, `_`, `-`, `/` and the globs `*` and `?`"
        );
        assert!(matches!(
            parse("[not, a, map]", Path::new("pins.yaml")),
            Err(LoadPinFileError::Parse { .. })
        ));
    }

    #[test]
    fn a_missing_file_pins_nothing_and_a_bad_one_keeps_the_last_good_pins() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pins.yaml");
        let file = PinFile::new(path.clone());
        assert!(file.current().is_empty());

        std::fs::write(&path, "docker.io: [nginx:stable]").unwrap();
        assert!(file
            .current()
            .is_pinned("docker.io", "library/nginx", "stable"));

        std::fs::write(&path, "docker.io: [nginx:stable").unwrap();
        assert!(file
            .current()
            .is_pinned("docker.io", "library/nginx", "stable"));

        std::fs::write(&path, "").unwrap();
        assert!(
            file.current()
                .is_pinned("docker.io", "library/nginx", "stable"),
            "an empty (half-written) file keeps the last good pins"
        );

        std::fs::write(&path, "docker.io: [redis]").unwrap();
        let rules = file.current();
        assert!(rules.is_pinned("docker.io", "library/redis", "7"));
        assert!(!rules.is_pinned("docker.io", "library/nginx", "stable"));

        std::fs::remove_file(&path).unwrap();
        assert!(file.current().is_empty());
    }
}
