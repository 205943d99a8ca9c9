//! Images: reference normalisation, pull policies, and real pulls through the node's containerd
//! with `ctr`.
//!
//! An image given with `--image REF=DIR` is "present" like a `kind load`ed image and is never
//! pulled; its DIR becomes the container's `/usr/local/bin`. Any other image is pulled for real
//! (`ctr -n k8s.io images pull --hosts-dir …`), honouring `imagePullPolicy`, but its files are
//! not run: the container runs its `command` with the host's binaries.
//!
//! Invariants: the pure functions decide (normalised reference, effective policy, whether to
//! pull); every `ctr` call has a deadline and is killed past it.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::host_command::{self, RunHostCommandError};

/// The containerd namespace the kubelet uses.
pub const CONTAINERD_NAMESPACE: &str = "k8s.io";
/// Deadline of one pull.
pub const PULL_TIMEOUT: Duration = Duration::from_secs(300);
/// Deadline of `ctr images ls`.
const LIST_TIMEOUT: Duration = Duration::from_secs(30);

/// `busybox:1.36` → `docker.io/library/busybox:1.36`; no tag and no digest → `:latest`.
pub fn normalize(reference: &str) -> String {
    let reference = reference.trim();
    let (name, suffix) = match reference.split_once('@') {
        Some((name, digest)) => (name, format!("@{digest}")),
        None => {
            let last_slash = reference.rfind('/').map_or(0, |i| i + 1);
            match reference[last_slash..].rfind(':') {
                Some(colon) => (
                    &reference[..last_slash + colon],
                    reference[last_slash + colon..].to_owned(),
                ),
                None => (reference, ":latest".to_owned()),
            }
        }
    };
    let qualified = match name.split_once('/') {
        Some((first, _)) if first.contains('.') || first.contains(':') || first == "localhost" => {
            name.to_owned()
        }
        Some(_) => format!("docker.io/{name}"),
        None => format!("docker.io/library/{name}"),
    };
    format!("{qualified}{suffix}")
}

/// `imagePullPolicy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PullPolicy {
    /// Pull on every container start.
    Always,
    /// Pull only when the image is not in containerd.
    IfNotPresent,
    /// Never pull.
    Never,
}

/// The effective policy: the spec's, else `Always` for `:latest` or an untagged image (without
/// digest) and `IfNotPresent` otherwise, as the API server defaults it.
pub fn effective_policy(spec: Option<&str>, reference: &str) -> PullPolicy {
    match spec {
        Some("Always") => PullPolicy::Always,
        Some("IfNotPresent") => PullPolicy::IfNotPresent,
        Some("Never") => PullPolicy::Never,
        _ => {
            let normalized = normalize(reference);
            if !normalized.contains('@') && normalized.ends_with(":latest") {
                PullPolicy::Always
            } else {
                PullPolicy::IfNotPresent
            }
        }
    }
}

/// What to do about a non-local image before a container start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PullDecision {
    /// Pull it.
    Pull,
    /// It is present; use it.
    UsePresent,
    /// Policy `Never` and absent: `ErrImageNeverPull`.
    NeverPullAbsent,
}

/// Whether to pull under `policy` when the image is (or is not) `present`.
pub fn decide_pull(policy: PullPolicy, present: bool) -> PullDecision {
    match (policy, present) {
        (PullPolicy::Always, _) | (PullPolicy::IfNotPresent, false) => PullDecision::Pull,
        (PullPolicy::IfNotPresent, true) | (PullPolicy::Never, true) => PullDecision::UsePresent,
        (PullPolicy::Never, false) => PullDecision::NeverPullAbsent,
    }
}

/// The image ID reported for `normalized` with manifest `digest`: `repo@digest`.
pub fn image_id(normalized: &str, digest: &str) -> String {
    let repo = match normalized.split_once('@') {
        Some((repo, _)) => repo,
        None => {
            let last_slash = normalized.rfind('/').map_or(0, |i| i + 1);
            match normalized[last_slash..].rfind(':') {
                Some(colon) => &normalized[..last_slash + colon],
                None => normalized,
            }
        }
    };
    format!("{repo}@{digest}")
}

/// The digest of `normalized` in `ctr images ls` output (`REF TYPE DIGEST …` columns).
pub fn digest_in_listing(listing: &str, normalized: &str) -> Option<String> {
    listing.lines().skip(1).find_map(|line| {
        let mut columns = line.split_whitespace();
        let reference = columns.next()?;
        let _type = columns.next()?;
        let digest = columns.next()?;
        (reference == normalized).then(|| digest.to_owned())
    })
}

/// Pulls images through a node's containerd.
#[derive(Debug, Clone)]
pub struct Puller {
    /// The `ctr` executable.
    pub ctr: PathBuf,
    /// containerd's socket.
    pub socket: PathBuf,
    /// The node's `certs.d` (mirrors), given to `ctr --hosts-dir`.
    pub hosts_dir: Option<PathBuf>,
}

/// Why an image could not be pulled or looked up.
#[derive(Debug, thiserror::Error)]
pub enum PullImageError {
    /// `ctr images pull` failed.
    #[error("pull {reference}: {source}")]
    Pull {
        /// The image.
        reference: String,
        /// Why.
        source: RunHostCommandError,
    },
    /// `ctr images ls` failed.
    #[error("list images: {source}")]
    List {
        /// Why.
        source: RunHostCommandError,
    },
    /// Pulled, but not in the listing afterwards.
    #[error("{0} is not in containerd after the pull")]
    Vanished(String),
}

fn path_arg(path: &Path) -> String {
    path.to_string_lossy().into_owned()
}

impl Puller {
    fn base_args(&self) -> Vec<String> {
        vec![
            "--address".to_owned(),
            path_arg(&self.socket),
            "-n".to_owned(),
            CONTAINERD_NAMESPACE.to_owned(),
        ]
    }

    /// The `ctr` arguments that pull `normalized` (pure).
    pub fn pull_args(&self, normalized: &str) -> Vec<String> {
        let mut args = self.base_args();
        args.extend(["images".to_owned(), "pull".to_owned()]);
        if let Some(dir) = &self.hosts_dir {
            args.extend(["--hosts-dir".to_owned(), path_arg(dir)]);
        }
        args.push(normalized.to_owned());
        args
    }

    /// The digest of `normalized` if containerd has it.
    pub async fn present_digest(&self, normalized: &str) -> Result<Option<String>, PullImageError> {
        let mut args = self.base_args();
        args.extend(["images".to_owned(), "ls".to_owned()]);
        let listing = host_command::run(&path_arg(&self.ctr), &args, LIST_TIMEOUT)
            .await
            .map_err(|source| PullImageError::List { source })?;
        Ok(digest_in_listing(&listing.stdout, normalized))
    }

    /// Pulls `normalized` and returns its digest.
    pub async fn pull(&self, normalized: &str) -> Result<String, PullImageError> {
        host_command::run(
            &path_arg(&self.ctr),
            &self.pull_args(normalized),
            PULL_TIMEOUT,
        )
        .await
        .map_err(|source| PullImageError::Pull {
            reference: normalized.to_owned(),
            source,
        })?;
        self.present_digest(normalized)
            .await?
            .ok_or_else(|| PullImageError::Vanished(normalized.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;

    #[test]
    fn references_are_normalised_like_containerd_does() {
        let cases = [
            ("busybox", "docker.io/library/busybox:latest"),
            ("busybox:1.36", "docker.io/library/busybox:1.36"),
            ("library/busybox:1.36", "docker.io/library/busybox:1.36"),
            ("me/app", "docker.io/me/app:latest"),
            (
                "ghcr.io/cachalot-dev/cachalot:0.1.0",
                "ghcr.io/cachalot-dev/cachalot:0.1.0",
            ),
            ("localhost/app", "localhost/app:latest"),
            ("127.0.0.1:5000/app", "127.0.0.1:5000/app:latest"),
            ("registry:5000/a/b:v1", "registry:5000/a/b:v1"),
            ("alpine@sha256:0123", "docker.io/library/alpine@sha256:0123"),
        ];
        for (input, want) in cases {
            assert_eq!(normalize(input), want, "input {input}");
        }
    }

    #[test]
    fn default_policy_is_always_for_latest_and_if_not_present_otherwise() {
        assert_eq!(effective_policy(None, "busybox"), PullPolicy::Always);
        assert_eq!(effective_policy(None, "busybox:latest"), PullPolicy::Always);
        assert_eq!(
            effective_policy(None, "busybox:1.36"),
            PullPolicy::IfNotPresent
        );
        assert_eq!(
            effective_policy(None, "busybox@sha256:00"),
            PullPolicy::IfNotPresent
        );
        assert_eq!(
            effective_policy(Some("Never"), "busybox"),
            PullPolicy::Never
        );
        assert_eq!(
            effective_policy(Some("IfNotPresent"), "busybox"),
            PullPolicy::IfNotPresent
        );
    }

    #[test]
    fn pull_decisions_follow_the_policy() {
        assert_eq!(decide_pull(PullPolicy::Always, true), PullDecision::Pull);
        assert_eq!(
            decide_pull(PullPolicy::IfNotPresent, false),
            PullDecision::Pull
        );
        assert_eq!(
            decide_pull(PullPolicy::IfNotPresent, true),
            PullDecision::UsePresent
        );
        assert_eq!(
            decide_pull(PullPolicy::Never, true),
            PullDecision::UsePresent
        );
        assert_eq!(
            decide_pull(PullPolicy::Never, false),
            PullDecision::NeverPullAbsent
        );
    }

    #[test]
    fn digests_are_read_from_the_listing_and_ids_name_the_repository() {
        let listing = "REF TYPE DIGEST SIZE PLATFORMS LABELS\n\
            docker.io/library/busybox:1.36 application/vnd.oci.image.manifest.v1+json sha256:abc 1.0 KiB linux/amd64 -\n";
        assert_eq!(
            digest_in_listing(listing, "docker.io/library/busybox:1.36").as_deref(),
            Some("sha256:abc")
        );
        assert_eq!(
            digest_in_listing(listing, "docker.io/library/busybox:1.37"),
            None
        );
        assert_eq!(
            image_id("docker.io/library/busybox:1.36", "sha256:abc"),
            "docker.io/library/busybox@sha256:abc"
        );
        assert_eq!(
            image_id("registry:5000/a@sha256:1", "sha256:1"),
            "registry:5000/a@sha256:1"
        );
    }

    #[test]
    fn pull_arguments_name_socket_namespace_and_hosts_dir() {
        let puller = Puller {
            ctr: "/usr/bin/ctr".into(),
            socket: "/run/c.sock".into(),
            hosts_dir: Some("/n1/etc/containerd/certs.d".into()),
        };
        assert_eq!(
            puller.pull_args("docker.io/library/busybox:1.36").join(" "),
            "--address /run/c.sock -n k8s.io images pull --hosts-dir /n1/etc/containerd/certs.d docker.io/library/busybox:1.36"
        );
    }
}
