//! The thin file-system side of the agent: scan what is on disk into [`Observed`], and execute a
//! [`Plan`]'s actions safely.
//!
//! Invariants:
//! - Writes are atomic: a temp file in the same directory, fsync, rename, fsync of the directory.
//!   A private file ([`is_private_file`], the client key) is created mode 0600 from the start,
//!   so it is never readable by others, not even as a temp file.
//! - Nothing is followed through a symlink: symlinked directories or files are reported as
//!   [`Existing::Unsafe`] and never written through.
//! - Before replacing or removing a file the executor re-reads it and refuses if it is no longer
//!   what the planner saw (an administrator may have edited it in between).
//! - Only single path components below the given roots are ever joined.

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use super::docker::{plan_docker, DockerPlan, Outcome as DockerOutcome};
use super::plan::{Action, Existing, Observed, ObservedDir, Root, COMPANION_FILES};
use super::render::{
    crio_file_name, is_private_file, parse_marker, CA_FILE_NAME, CLIENT_CERT_FILE_NAME,
    CLIENT_KEY_FILE_NAME, HOSTS_FILE_NAME, ORIGINAL_FILE_NAME,
};

/// Files larger than this are not ours and are not read.
const MAX_FILE_BYTES: u64 = 1024 * 1024;
/// Bound on the directory entries scanned per round.
const MAX_DIR_ENTRIES: usize = 4096;
/// Prefix of our temporary files (dot-files, ignored by containerd and CRI-O).
const TEMP_PREFIX: &str = ".cachalot-tmp-";

/// The roots the agent may write below.
#[derive(Debug, Clone)]
pub struct Roots {
    /// containerd certs.d (as mounted in the agent).
    pub certs_dir: PathBuf,
    /// CRI-O `registries.conf.d`, when the node runs CRI-O.
    pub registries_conf_dir: Option<PathBuf>,
}

/// Scanning the node's directories failed.
#[derive(Debug, thiserror::Error)]
pub enum ScanError {
    /// The root directory could not be listed.
    #[error("listing {path}: {source}")]
    ListDir {
        /// The directory.
        path: PathBuf,
        /// The I/O error.
        source: io::Error,
    },
}

/// Executing one action failed.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// The root directory is not configured (CRI-O action without `--registries-conf-dir`).
    #[error("no directory configured for {0:?}")]
    NoRoot(Root),
    /// A path is a symlink or not a regular file/directory.
    #[error("{path} is a symlink or not a regular file; refusing to write through it")]
    Unsafe {
        /// The path.
        path: PathBuf,
    },
    /// The file changed since it was planned.
    #[error("{path} changed since it was read; will retry next round")]
    Changed {
        /// The path.
        path: PathBuf,
    },
    /// An I/O step failed.
    #[error("{action} {path}: {source}")]
    Io {
        /// What we were doing.
        action: &'static str,
        /// The path.
        path: PathBuf,
        /// The I/O error.
        source: io::Error,
    },
}

fn io_err<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> ApplyError + 'a {
    move |source| ApplyError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

/// Reads a regular file without following a symlink; `Ok(None)` when absent.
fn read_existing(path: &Path) -> Option<Existing> {
    let meta = match fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return None,
        Err(e) => return Some(Existing::Unsafe(format!("cannot stat: {e}"))),
    };
    if meta.file_type().is_symlink() {
        return Some(Existing::Unsafe("it is a symlink".into()));
    }
    if !meta.is_file() {
        return Some(Existing::Unsafe("it is not a regular file".into()));
    }
    if meta.len() > MAX_FILE_BYTES {
        return Some(Existing::Unsafe(format!(
            "it is larger than {MAX_FILE_BYTES} bytes"
        )));
    }
    match fs::read_to_string(path) {
        Ok(text) => Some(Existing::File(text)),
        Err(e) => Some(Existing::Unsafe(format!("cannot read: {e}"))),
    }
}

/// Scans the certs dir (one level of host namespace directories) and this mirror's CRI-O drop-in.
///
/// # Errors
/// The certs dir cannot be listed (a missing certs dir is not an error: nothing is there).
pub fn scan(roots: &Roots, mirror: &str) -> Result<Observed, ScanError> {
    let mut dirs = BTreeMap::new();
    match fs::read_dir(&roots.certs_dir) {
        Ok(entries) => {
            for entry in entries.take(MAX_DIR_ENTRIES) {
                let entry = entry.map_err(|source| ScanError::ListDir {
                    path: roots.certs_dir.clone(),
                    source,
                })?;
                let Some(name) = entry.file_name().to_str().map(str::to_string) else {
                    continue;
                };
                if name.starts_with('.') {
                    continue;
                }
                let path = entry.path();
                let observed = match fs::symlink_metadata(&path) {
                    Ok(m) if m.file_type().is_symlink() => ObservedDir {
                        hosts: Some(Existing::Unsafe("the directory is a symlink".into())),
                        ..ObservedDir::default()
                    },
                    Ok(m) if m.is_dir() => ObservedDir {
                        hosts: read_existing(&path.join(HOSTS_FILE_NAME)),
                        original: match read_existing(&path.join(ORIGINAL_FILE_NAME)) {
                            Some(Existing::File(text)) => Some(text),
                            _ => None,
                        },
                        ca: read_existing(&path.join(CA_FILE_NAME)),
                        client_cert: read_existing(&path.join(CLIENT_CERT_FILE_NAME)),
                        client_key: read_existing(&path.join(CLIENT_KEY_FILE_NAME)),
                    },
                    _ => continue,
                };
                dirs.insert(name, observed);
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(ScanError::ListDir {
                path: roots.certs_dir.clone(),
                source,
            })
        }
    }
    let crio_file = match (&roots.registries_conf_dir, crio_file_name(mirror)) {
        (Some(dir), Ok(file)) => read_existing(&dir.join(file)),
        _ => None,
    };
    Ok(Observed { dirs, crio_file })
}

/// Relative paths (`<dir>/hosts.toml`, `<dir>/cachalot-ca.crt`, `<dir>/cachalot-client.crt`,
/// `<dir>/cachalot-client.key`, `<dropin>`) of the files on disk carrying our marker.
#[must_use]
pub fn managed_files(observed: &Observed, mirror: &str) -> Vec<String> {
    let is_ours = |e: Option<&Existing>| matches!(e, Some(Existing::File(t)) if parse_marker(t).is_some_and(|m| m.mirror == mirror));
    let mut files: Vec<String> = Vec::new();
    for (name, dir) in &observed.dirs {
        if is_ours(dir.hosts.as_ref()) {
            files.push(format!("{name}/{HOSTS_FILE_NAME}"));
        }
        for file in COMPANION_FILES {
            if is_ours(dir.companion(file)) {
                files.push(format!("{name}/{file}"));
            }
        }
    }
    if is_ours(observed.crio_file.as_ref()) {
        if let Ok(name) = crio_file_name(mirror) {
            files.push(name);
        }
    }
    files.sort();
    files
}

fn root_dir(roots: &Roots, root: Root) -> Result<&Path, ApplyError> {
    match root {
        Root::CertsDir => Ok(&roots.certs_dir),
        Root::RegistriesConfDir => roots
            .registries_conf_dir
            .as_deref()
            .ok_or(ApplyError::NoRoot(root)),
    }
}

/// Fsyncs a directory so a rename or unlink in it is durable.
fn sync_dir(dir: &Path) -> Result<(), ApplyError> {
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("syncing directory", dir))
}

/// Ensures `base/dir` is a real directory (creating it, one level only), refusing symlinks.
fn ensure_dir(base: &Path, dir: &str) -> Result<PathBuf, ApplyError> {
    let path = if dir.is_empty() {
        base.to_path_buf()
    } else {
        base.join(dir)
    };
    match fs::symlink_metadata(&path) {
        Ok(m) if m.is_dir() && !m.file_type().is_symlink() => Ok(path),
        Ok(_) => Err(ApplyError::Unsafe { path }),
        Err(e) if e.kind() == io::ErrorKind::NotFound && !dir.is_empty() => {
            fs::create_dir(&path).map_err(io_err("creating directory", &path))?;
            sync_dir(base)?;
            Ok(path)
        }
        Err(source) => Err(ApplyError::Io {
            action: "inspecting",
            path,
            source,
        }),
    }
}

/// Writes `content` to `dir/file` atomically: temp file in `dir`, fsync, rename, fsync `dir`.
fn write_atomic(dir: &Path, file: &str, content: &str) -> Result<(), ApplyError> {
    let target = dir.join(file);
    let temp = dir.join(format!("{TEMP_PREFIX}{file}-{}", std::process::id()));
    let result = (|| {
        let mut options = fs::OpenOptions::new();
        options.write(true).create(true).truncate(true);
        if is_private_file(file) {
            std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        }
        let mut f = options
            .open(&temp)
            .map_err(io_err("creating temp file", &temp))?;
        if is_private_file(file) {
            // A temp file left by a crashed write keeps its mode: make sure it is 0600.
            f.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o600))
                .map_err(io_err("restricting", &temp))?;
        }
        f.write_all(content.as_bytes())
            .map_err(io_err("writing", &temp))?;
        f.sync_all().map_err(io_err("fsyncing", &temp))?;
        fs::rename(&temp, &target).map_err(io_err("renaming into place", &target))?;
        sync_dir(dir)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&temp);
    }
    result
}

/// Removes temp files a crashed write of ours left behind (they would keep the directory from
/// being removed). Best effort and bounded; only our own prefix is touched.
fn remove_stale_temp_files(dir: &Path) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.take(MAX_DIR_ENTRIES).flatten() {
        let ours = entry
            .file_name()
            .to_str()
            .is_some_and(|n| n.starts_with(TEMP_PREFIX));
        let regular = entry.file_type().is_ok_and(|t| t.is_file());
        if ours && regular {
            let _ = fs::remove_file(entry.path());
        }
    }
}

/// Refuses when the file at `path` is no longer what the planner saw.
fn check_unchanged(path: &Path, previous: Option<&str>) -> Result<(), ApplyError> {
    let now = read_existing(path);
    let same = match (&now, previous) {
        (None, None) => true,
        (Some(Existing::File(text)), Some(prev)) => text == prev,
        _ => false,
    };
    if same {
        Ok(())
    } else {
        Err(ApplyError::Changed {
            path: path.to_path_buf(),
        })
    }
}

/// Executes one planned action.
///
/// # Errors
/// See [`ApplyError`]; the caller reports it and retries on the next round.
pub fn execute(roots: &Roots, action: &Action) -> Result<(), ApplyError> {
    match action {
        Action::Write {
            root,
            dir,
            file,
            content,
            previous,
        } => {
            let base = root_dir(roots, *root)?;
            let dir_path = ensure_dir(base, dir)?;
            check_unchanged(&dir_path.join(file), previous.as_deref())?;
            write_atomic(&dir_path, file, content)
        }
        Action::Remove { root, dir, file } => {
            let base = root_dir(roots, *root)?;
            let dir_path = if dir.is_empty() {
                base.to_path_buf()
            } else {
                base.join(dir)
            };
            let path = dir_path.join(file);
            // Only remove what still carries our marker.
            match read_existing(&path) {
                Some(Existing::File(text)) if parse_marker(&text).is_some() => {}
                None => return Ok(()),
                _ => return Err(ApplyError::Changed { path }),
            }
            fs::remove_file(&path).map_err(io_err("removing", &path))?;
            sync_dir(&dir_path)?;
            if !dir.is_empty() {
                remove_stale_temp_files(&dir_path);
                // Succeeds only when empty: directories holding anything else (an admin's
                // certificates) stay.
                if fs::remove_dir(&dir_path).is_ok() {
                    sync_dir(base)?;
                }
            }
            Ok(())
        }
        Action::RestoreOriginal { dir } => {
            let dir_path = roots.certs_dir.join(dir);
            let original = dir_path.join(ORIGINAL_FILE_NAME);
            let target = dir_path.join(HOSTS_FILE_NAME);
            match read_existing(&target) {
                Some(Existing::File(text)) if parse_marker(&text).is_some() => {}
                _ => return Err(ApplyError::Changed { path: target }),
            }
            fs::rename(&original, &target).map_err(io_err("restoring original", &target))?;
            sync_dir(&dir_path)
        }
    }
}

/// The file beside `daemon.json` that holds the mirror entry this mirror last wrote there, so
/// that a changed endpoint's old entry is taken out (`.cachalot-<namespace>-<name>.mirror`).
fn docker_entry_file(mirror: &str) -> Result<String, ApplyError> {
    super::names::validate_mirror(mirror).map_err(|_| ApplyError::Unsafe {
        path: PathBuf::from(mirror),
    })?;
    Ok(format!(".cachalot-{}.mirror", mirror.replace('/', "-")))
}

/// Runtime Docker: plans `daemon.json` at `config` with [`plan_docker`] and applies it (atomic
/// write, refused when the file changed since it was read; never through a symlink), keeping
/// this mirror's entry beside it. Returns the plan and whether `daemon.json` changed (dockerd
/// must then reload).
///
/// # Errors
/// The file is unsafe to touch, changed meanwhile, or an I/O step failed.
pub fn apply_docker(
    config: &Path,
    desired: &super::protocol::DesiredState,
    live: &std::collections::BTreeSet<String>,
) -> Result<(DockerPlan, bool), ApplyError> {
    let unsafe_path = || ApplyError::Unsafe {
        path: config.to_path_buf(),
    };
    let dir = config.parent().ok_or_else(unsafe_path)?;
    let file = config
        .file_name()
        .and_then(|f| f.to_str())
        .ok_or_else(unsafe_path)?;
    let existing = match read_existing(config) {
        None => None,
        Some(Existing::File(text)) => Some(text),
        Some(Existing::Unsafe(_)) => return Err(unsafe_path()),
    };
    let entry_file = docker_entry_file(&desired.mirror)?;
    let entry_path = dir.join(&entry_file);
    let previous = match read_existing(&entry_path) {
        Some(Existing::File(text)) => Some(text.trim().to_owned()).filter(|t| !t.is_empty()),
        _ => None,
    };
    let plan = plan_docker(desired, existing.as_deref(), previous.as_deref(), live);
    let changed = match &plan.outcome {
        DockerOutcome::Write(content) => {
            check_unchanged(config, existing.as_deref())?;
            write_atomic(dir, file, content)?;
            true
        }
        DockerOutcome::Unchanged => false,
    };
    match (&plan.entry, &previous) {
        (Some(entry), previous) if previous.as_ref() != Some(entry) => {
            write_atomic(dir, &entry_file, &format!("{entry}\n"))?;
        }
        (None, Some(_)) => {
            fs::remove_file(&entry_path).map_err(io_err("removing", &entry_path))?;
            sync_dir(dir)?;
        }
        _ => {}
    }
    Ok((plan, changed))
}
