//! Making the node's runtime re-read the configuration the agent changed: CRI-O reloads
//! `containers-registries.conf(5)` (and its `.d` drop-ins) on SIGHUP (crio.conf(5)); dockerd
//! reloads `daemon.json`, `registry-mirrors` included, on SIGHUP (dockerd(8), "configuration
//! reload behavior").
//!
//! The agent learns the runtime's pid from a pid file the administrator points it at
//! (`--crio-pid-file`, `--docker-pid-file`); nothing is searched for. A pid in the file is the host's pid, so the
//! DaemonSet needs `hostPID: true` for it to name the same process, and root (CAP_KILL) to
//! signal a process of another user; that is all. [`parse_pid`] is pure; [`signal_reload`] reads
//! the file and sends the one signal.

use std::path::{Path, PathBuf};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// Telling the runtime to reload failed; the file is written but the runtime may not use it yet.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ReloadRuntimeError {
    /// The pid file could not be read.
    #[error("reading {runtime}'s pid file {path}: {message}")]
    ReadPidFile {
        /// The runtime (`CRI-O`, `dockerd`).
        runtime: &'static str,
        /// The pid file.
        path: PathBuf,
        /// The I/O error's text.
        message: String,
    },
    /// The pid file does not hold one positive decimal pid.
    #[error("{runtime}'s pid file {path} does not hold a pid: {why}")]
    ParsePid {
        /// The runtime.
        runtime: &'static str,
        /// The pid file.
        path: PathBuf,
        /// What is wrong with its content.
        why: String,
    },
    /// kill(2) refused: no such process (stale pid file, or no `hostPID`) or not permitted.
    #[error("sending SIGHUP to {runtime} (pid {pid}): {errno}")]
    Signal {
        /// The runtime.
        runtime: &'static str,
        /// The pid read from the file.
        pid: i32,
        /// The system error.
        errno: nix::errno::Errno,
    },
}

/// The pid in a pid file's text: one positive decimal integer, surrounding whitespace allowed.
/// Pid 1 is refused too: SIGHUP to the node's init is never what a pid file meant.
///
/// # Errors
/// What is wrong with the text, for the [`ReloadRuntimeError::ParsePid`] message.
pub fn parse_pid(text: &str) -> Result<i32, String> {
    let trimmed = text.trim();
    if trimmed.is_empty() {
        return Err("the file is empty".into());
    }
    let shown: String = trimmed.chars().take(32).collect();
    if !trimmed.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("`{shown}` is not a decimal number"));
    }
    match trimmed.parse::<i32>() {
        Ok(pid) if pid > 1 => Ok(pid),
        _ => Err(format!("`{shown}` is not a process id above 1")),
    }
}

/// Reads `pid_file` and sends SIGHUP to the pid in it; returns the pid signalled.
///
/// # Errors
/// See [`ReloadRuntimeError`].
pub fn signal_reload(pid_file: &Path, runtime: &'static str) -> Result<i32, ReloadRuntimeError> {
    // A pid file is a few bytes; anything longer than this is not one.
    let text = std::fs::read(pid_file).map_err(|e| ReloadRuntimeError::ReadPidFile {
        runtime,
        path: pid_file.to_owned(),
        message: e.to_string(),
    })?;
    let text = String::from_utf8_lossy(&text[..text.len().min(64)]).into_owned();
    let pid = parse_pid(&text).map_err(|why| ReloadRuntimeError::ParsePid {
        runtime,
        path: pid_file.to_owned(),
        why,
    })?;
    kill(Pid::from_raw(pid), Signal::SIGHUP).map_err(|errno| ReloadRuntimeError::Signal {
        runtime,
        pid,
        errno,
    })?;
    Ok(pid)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_pid_file_holds_one_decimal_pid_above_one() {
        assert_eq!(parse_pid("1234\n"), Ok(1234));
        assert_eq!(parse_pid("  42  "), Ok(42));
        for bad in [
            "",
            "\n",
            "-5",
            "1",
            "0",
            "12 34",
            "abc",
            "99999999999",
            "0x10",
        ] {
            assert!(parse_pid(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_missing_or_garbage_pid_file_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("crio.pid");
        assert!(matches!(
            signal_reload(&missing, "CRI-O"),
            Err(ReloadRuntimeError::ReadPidFile { path, .. }) if path == missing
        ));
        std::fs::write(&missing, "not a pid").unwrap();
        assert!(matches!(
            signal_reload(&missing, "CRI-O"),
            Err(ReloadRuntimeError::ParsePid { .. })
        ));
    }
}
