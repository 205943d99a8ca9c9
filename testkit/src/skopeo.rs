//! skopeo (Debian 1.9.3) as a real registry client: copy to an OCI layout and inspect.
//!
//! Every call talks plain HTTP (`--src-tls-verify=false` / `--tls-verify=false`), skips the
//! signature policy (`--insecure-policy`), has a timeout and is killed when it expires. skopeo
//! verifies every blob digest it copies, so a successful copy is itself a digest check.

use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

/// Where Debian installs skopeo.
pub const DEFAULT_SKOPEO: &str = "/usr/bin/skopeo";

/// Timeout of each skopeo command.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(180);

/// Why a skopeo command failed.
#[derive(Debug, thiserror::Error)]
pub enum RunSkopeoError {
    /// skopeo is not installed.
    #[error(
        "{DEFAULT_SKOPEO} not found: run scripts/install-test-deps to install the skopeo package"
    )]
    BinaryMissing,
    /// skopeo could not be spawned.
    #[error("spawn skopeo")]
    Spawn {
        /// The I/O error.
        source: std::io::Error,
    },
    /// skopeo did not finish in time and was killed.
    #[error("skopeo {args} did not finish within {timeout:?}")]
    TimedOut {
        /// Its arguments.
        args: String,
        /// The timeout.
        timeout: Duration,
    },
    /// skopeo exited non-zero.
    #[error("skopeo {args} failed ({status}): {stderr}")]
    Failed {
        /// Its arguments.
        args: String,
        /// Exit status.
        status: ExitStatus,
        /// Its stderr.
        stderr: String,
    },
    /// Its output, or the OCI layout it wrote, is not the JSON expected.
    #[error("parse {what}")]
    Parse {
        /// What was parsed.
        what: String,
        /// The serde error.
        source: serde_json::Error,
    },
    /// The OCI layout could not be read.
    #[error("read {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// Options for [`copy_to_oci_dir_with`].
#[derive(Debug, Clone, Copy, Default)]
pub struct CopyOptions {
    /// `--all`: copy every platform of an index, not just the host's.
    pub all_platforms: bool,
    /// `--preserve-digests`: fail rather than convert the manifest (keeps manifest digests).
    pub preserve_digests: bool,
}

/// Prefixes `docker://` unless the reference already names a transport.
#[must_use]
pub fn docker_transport(reference: &str) -> String {
    if reference.starts_with("docker://") {
        reference.to_owned()
    } else {
        format!("docker://{reference}")
    }
}

/// Runs skopeo with `args`; a non-zero exit is an error carrying stderr. Returns stdout.
///
/// # Errors
/// See [`RunSkopeoError`].
pub async fn run(args: &[String]) -> Result<Vec<u8>, RunSkopeoError> {
    if !Path::new(DEFAULT_SKOPEO).is_file() {
        return Err(RunSkopeoError::BinaryMissing);
    }
    let child = tokio::process::Command::new(DEFAULT_SKOPEO)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| RunSkopeoError::Spawn { source })?;
    let output = tokio::time::timeout(COMMAND_TIMEOUT, child.wait_with_output())
        .await
        .map_err(|_| RunSkopeoError::TimedOut {
            args: args.join(" "),
            timeout: COMMAND_TIMEOUT,
        })?
        .map_err(|source| RunSkopeoError::Spawn { source })?;
    if !output.status.success() {
        return Err(RunSkopeoError::Failed {
            args: args.join(" "),
            status: output.status,
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        });
    }
    Ok(output.stdout)
}

/// `skopeo copy --src-tls-verify=false docker://SRC oci:DEST`, host platform only.
/// `src` is `127.0.0.1:PORT/repo:tag` (or `@sha256:...`), with or without `docker://`.
///
/// # Errors
/// See [`RunSkopeoError`].
pub async fn copy_to_oci_dir(src: &str, dest_dir: &Path) -> Result<(), RunSkopeoError> {
    copy_to_oci_dir_with(src, dest_dir, CopyOptions::default()).await
}

/// [`copy_to_oci_dir`] with options.
///
/// # Errors
/// See [`RunSkopeoError`].
pub async fn copy_to_oci_dir_with(
    src: &str,
    dest_dir: &Path,
    options: CopyOptions,
) -> Result<(), RunSkopeoError> {
    let mut args = vec![
        "--insecure-policy".to_owned(),
        "copy".to_owned(),
        "--src-tls-verify=false".to_owned(),
    ];
    if options.all_platforms {
        args.push("--all".to_owned());
    }
    if options.preserve_digests {
        args.push("--preserve-digests".to_owned());
    }
    args.push(docker_transport(src));
    args.push(format!("oci:{}", dest_dir.display()));
    run(&args).await.map(|_| ())
}

/// `skopeo inspect --tls-verify=false docker://SRC`, parsed (`Digest`, `Layers`, ...).
///
/// # Errors
/// See [`RunSkopeoError`].
pub async fn inspect(src: &str) -> Result<serde_json::Value, RunSkopeoError> {
    let args = vec![
        "inspect".to_owned(),
        "--tls-verify=false".to_owned(),
        docker_transport(src),
    ];
    let stdout = run(&args).await?;
    serde_json::from_slice(&stdout).map_err(|source| RunSkopeoError::Parse {
        what: "skopeo inspect output".to_owned(),
        source,
    })
}

/// `skopeo inspect --raw`: the manifest bytes exactly as the registry served them.
///
/// # Errors
/// See [`RunSkopeoError`].
pub async fn inspect_raw(src: &str) -> Result<Vec<u8>, RunSkopeoError> {
    run(&[
        "inspect".to_owned(),
        "--tls-verify=false".to_owned(),
        "--raw".to_owned(),
        docker_transport(src),
    ])
    .await
}

/// The manifest digests listed in an OCI layout's `index.json`.
///
/// # Errors
/// [`RunSkopeoError::Read`] or [`RunSkopeoError::Parse`].
pub fn oci_layout_manifests(dir: &Path) -> Result<Vec<String>, RunSkopeoError> {
    let path = dir.join("index.json");
    let bytes = std::fs::read(&path).map_err(|source| RunSkopeoError::Read {
        path: path.clone(),
        source,
    })?;
    let index: serde_json::Value =
        serde_json::from_slice(&bytes).map_err(|source| RunSkopeoError::Parse {
            what: path.display().to_string(),
            source,
        })?;
    Ok(index["manifests"]
        .as_array()
        .map(|entries| {
            entries
                .iter()
                .filter_map(|e| e["digest"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default())
}

/// Whether an OCI layout holds a blob (`blobs/sha256/<hex>`).
#[must_use]
pub fn oci_layout_has_blob(dir: &Path, digest: &str) -> bool {
    digest
        .split_once(':')
        .is_some_and(|(alg, hex)| dir.join("blobs").join(alg).join(hex).is_file())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    #[test]
    fn docker_transport_is_added_once() {
        assert_eq!(
            docker_transport("127.0.0.1:1/a:b"),
            "docker://127.0.0.1:1/a:b"
        );
        assert_eq!(
            docker_transport("docker://127.0.0.1:1/a:b"),
            "docker://127.0.0.1:1/a:b"
        );
    }
}
