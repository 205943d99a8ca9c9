//! Where the test cluster's executables are: the control plane built by `scripts/control-plane`,
//! the workspace's own binaries (the kubelet stand-in, the registry, the operator) next to the
//! test executable, and pinned kubectl and helm from the tool cache that `scripts/test` fills.
//!
//! Invariant: lookups never build or download anything; a missing tool is an error that says
//! which command provides it.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Environment variable naming the control plane's bin directory (overrides the cache lookup).
pub const CONTROL_PLANE_BIN_ENV: &str = "CACHALOT_CONTROL_PLANE_BIN";
/// The control-plane executables the fixture starts.
pub const CONTROL_PLANE_BINARIES: [&str; 4] = [
    "etcd-embed",
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
];

/// Why a tool could not be found.
#[derive(Debug, thiserror::Error)]
pub enum FindToolError {
    /// The control plane has not been built.
    #[error("the control plane is not built in {dir} (missing {binary}): run scripts/control-plane (scripts/test does)")]
    ControlPlaneNotBuilt {
        /// The directory looked in.
        dir: PathBuf,
        /// The first missing executable.
        binary: &'static str,
    },
    /// A workspace binary has not been built.
    #[error("{binary} is not built next to the tests ({path}): run cargo build --workspace")]
    WorkspaceBinaryMissing {
        /// The binary's name.
        binary: String,
        /// Where it was expected.
        path: PathBuf,
    },
    /// kubectl or helm is missing.
    #[error(
        "{tool} not found (set {env}, or run scripts/test, which installs it into the tool cache)"
    )]
    ToolMissing {
        /// `kubectl` or `helm`.
        tool: &'static str,
        /// The environment variable that names it.
        env: &'static str,
    },
}

/// The repository's root (this crate's parent directory).
#[must_use]
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}

/// The control plane's bin directory: `$CACHALOT_CONTROL_PLANE_BIN`, else what
/// `scripts/control-plane dir` names; every executable must be there.
///
/// # Errors
/// [`FindToolError::ControlPlaneNotBuilt`].
pub fn control_plane_bin() -> Result<PathBuf, FindToolError> {
    let dir = match std::env::var_os(CONTROL_PLANE_BIN_ENV) {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => Command::new(repo_root().join("scripts/control-plane"))
            .arg("dir")
            .output()
            .ok()
            .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()))
            .unwrap_or_default(),
    };
    for binary in CONTROL_PLANE_BINARIES {
        if !dir.join(binary).is_file() {
            return Err(FindToolError::ControlPlaneNotBuilt { dir, binary });
        }
    }
    Ok(dir)
}

/// A binary of this workspace, built into the same target directory as the running test
/// (`target/<profile>/<name>`, the parent of the test's `deps/`).
///
/// # Errors
/// [`FindToolError::WorkspaceBinaryMissing`].
pub fn workspace_binary(name: &str) -> Result<PathBuf, FindToolError> {
    let env_name = format!(
        "CACHALOT_{}_BIN",
        name.trim_start_matches("cachalot-")
            .replace('-', "_")
            .to_uppercase()
    );
    if let Some(path) = std::env::var_os(&env_name).filter(|p| !p.is_empty()) {
        return Ok(PathBuf::from(path));
    }
    let exe = std::env::current_exe().unwrap_or_default();
    let mut candidates = Vec::new();
    for dir in exe.ancestors().skip(1).take(2) {
        candidates.push(dir.join(name));
    }
    candidates
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .ok_or_else(|| FindToolError::WorkspaceBinaryMissing {
            binary: name.to_owned(),
            path: candidates.last().cloned().unwrap_or_default(),
        })
}

fn tools_cache() -> PathBuf {
    if let Some(dir) = std::env::var_os("CACHALOT_TOOLS_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("/tmp"));
    cache.join("cachalot-tools")
}

fn find_tool(tool: &'static str, env: &'static str) -> Result<PathBuf, FindToolError> {
    if let Some(path) = std::env::var_os(env).filter(|p| !p.is_empty()) {
        return Ok(PathBuf::from(path));
    }
    // The pinned copy that tools/validate/env.sh installs (kubectl 1.35, helm 4).
    let pinned = tools_cache()
        .join("kubectl-layer-v35-2.2.2")
        .join(tool)
        .join(tool);
    if pinned.is_file() {
        return Ok(pinned);
    }
    Err(FindToolError::ToolMissing { tool, env })
}

/// kubectl: `$CACHALOT_KUBECTL`, else the pinned 1.35 in the tool cache.
///
/// # Errors
/// [`FindToolError::ToolMissing`].
pub fn kubectl() -> Result<PathBuf, FindToolError> {
    find_tool("kubectl", "CACHALOT_KUBECTL")
}

/// helm: `$CACHALOT_HELM`, else the pinned helm 4 in the tool cache.
///
/// # Errors
/// [`FindToolError::ToolMissing`].
pub fn helm() -> Result<PathBuf, FindToolError> {
    find_tool("helm", "CACHALOT_HELM")
}
