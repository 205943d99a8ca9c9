//! Long-running child processes started by the harness and by tests (distribution, containerd,
//! the binaries under test) and the private temp dir each one keeps its files in: stdout and
//! stderr go to one log file, start-up is awaited with a deadline while watching for an early
//! exit, and the process is killed and reaped on drop.
//!
//! Invariant: a [`LoggedChild`] is gone once its handle is dropped, so a temp dir holding its
//! files can be removed right after it. In a struct, declare the child before the `TempDir`:
//! fields drop in declaration order.

use std::fs::File;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use crate::wait::wait_for;

/// How much of the log [`LoggedChild::log_tail`] returns.
const LOG_TAIL_BYTES: usize = 4096;

/// Why a child's private directory could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum SetUpDirError {
    /// The temp dir could not be created.
    #[error("create a temp dir")]
    CreateTempDir {
        /// The I/O error.
        source: std::io::Error,
    },
    /// A file or directory in it could not be written.
    #[error("write {path}")]
    Write {
        /// The file or directory.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// A new private temp dir whose name starts with `prefix` (keep it short where unix sockets
/// live in it: their paths are limited to 108 bytes).
///
/// # Errors
/// [`SetUpDirError::CreateTempDir`].
pub fn private_dir(prefix: &str) -> Result<tempfile::TempDir, SetUpDirError> {
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .map_err(|source| SetUpDirError::CreateTempDir { source })
}

/// Writes `contents` to the file `path`.
///
/// # Errors
/// [`SetUpDirError::Write`].
pub fn write_file(path: &Path, contents: impl AsRef<[u8]>) -> Result<(), SetUpDirError> {
    std::fs::write(path, contents).map_err(|source| SetUpDirError::Write {
        path: path.to_owned(),
        source,
    })
}

/// Creates the directory `path` and its parents.
///
/// # Errors
/// [`SetUpDirError::Write`].
pub fn create_dir(path: &Path) -> Result<(), SetUpDirError> {
    std::fs::create_dir_all(path).map_err(|source| SetUpDirError::Write {
        path: path.to_owned(),
        source,
    })
}

/// Why a child process could not be started.
#[derive(Debug, thiserror::Error)]
pub enum SpawnLoggedError {
    /// Its log file could not be created.
    #[error("create log file {path}")]
    CreateLog {
        /// The log file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The process could not be spawned.
    #[error("spawn {binary}")]
    Spawn {
        /// The executable.
        binary: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// Why a started child did not become ready.
#[derive(Debug, thiserror::Error)]
pub enum NotReady {
    /// It exited before it was ready.
    #[error("exited during start-up ({status})")]
    Exited {
        /// Its exit status.
        status: ExitStatus,
    },
    /// It was still running but not ready when the deadline passed.
    #[error("not ready within {timeout:?}")]
    TimedOut {
        /// The deadline that passed.
        timeout: Duration,
    },
}

/// A running child whose output goes to a log file; killed and reaped on drop.
#[derive(Debug)]
pub struct LoggedChild {
    child: Child,
    log: PathBuf,
}

impl LoggedChild {
    /// Spawns `command` with stdin closed and stdout and stderr into a new file at `log`.
    ///
    /// # Errors
    /// See [`SpawnLoggedError`].
    pub fn spawn(command: &mut Command, log: &Path) -> Result<Self, SpawnLoggedError> {
        let create_log = |source| SpawnLoggedError::CreateLog {
            path: log.to_owned(),
            source,
        };
        let out = File::create(log).map_err(create_log)?;
        let err = out.try_clone().map_err(create_log)?;
        let child = command
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(|source| SpawnLoggedError::Spawn {
                binary: PathBuf::from(command.get_program()),
                source,
            })?;
        Ok(Self {
            child,
            log: log.to_owned(),
        })
    }

    /// Polls `ready` every `poll` until it answers `true`, for at most `timeout`, and stops early
    /// when the process exits.
    ///
    /// # Errors
    /// [`NotReady::Exited`] or [`NotReady::TimedOut`].
    pub async fn wait_ready<Fut: Future<Output = bool>>(
        &mut self,
        timeout: Duration,
        poll: Duration,
        mut ready: impl FnMut() -> Fut,
    ) -> Result<(), NotReady> {
        let child = &mut self.child;
        let outcome = wait_for(timeout, poll, || {
            let exited = child.try_wait().ok().flatten();
            let probe = ready();
            async move {
                if let Some(status) = exited {
                    return Some(Err(status));
                }
                probe.await.then_some(Ok(()))
            }
        })
        .await;
        match outcome {
            Ok(Ok(())) => Ok(()),
            Ok(Err(status)) => Err(NotReady::Exited { status }),
            Err(_) => Err(NotReady::TimedOut { timeout }),
        }
    }

    /// The last 4 KiB of its log, as lossy UTF-8 (empty if unreadable), for error messages.
    #[must_use]
    pub fn log_tail(&self) -> String {
        let bytes = std::fs::read(&self.log).unwrap_or_default();
        let start = bytes.len().saturating_sub(LOG_TAIL_BYTES);
        String::from_utf8_lossy(&bytes[start..]).into_owned()
    }

    /// Its log file.
    #[must_use]
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// Its process id.
    #[must_use]
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// Kills it with SIGKILL (what `kill -9` does: no chance to clean up) and reaps it.
    ///
    /// # Errors
    /// The I/O error of `kill` or `waitpid`.
    pub fn kill(&mut self) -> std::io::Result<ExitStatus> {
        self.child.kill()?;
        self.child.wait()
    }

    /// Its exit status if it has exited, without blocking.
    ///
    /// # Errors
    /// The I/O error of `waitpid`.
    pub fn try_wait(&mut self) -> std::io::Result<Option<ExitStatus>> {
        self.child.try_wait()
    }
}

impl Drop for LoggedChild {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    /// `/bin/sh -c script`, logging into `dir/sh.log`.
    fn spawn_sh(dir: &Path, script: &str) -> LoggedChild {
        let mut command = Command::new("/bin/sh");
        command.args(["-c", script]);
        LoggedChild::spawn(&mut command, &dir.join("sh.log")).unwrap()
    }

    /// Waits for a readiness that never comes.
    async fn wait_never_ready(child: &mut LoggedChild, timeout: Duration) -> NotReady {
        child
            .wait_ready(timeout, Duration::from_millis(10), || async { false })
            .await
            .unwrap_err()
    }

    #[tokio::test]
    async fn a_child_that_exits_during_start_up_is_reported_with_its_log() {
        let dir = tempfile::tempdir().unwrap();
        let mut child = spawn_sh(dir.path(), "echo going away; exit 3");
        let err = wait_never_ready(&mut child, Duration::from_secs(10)).await;
        assert!(
            matches!(err, NotReady::Exited { status } if status.code() == Some(3)),
            "{err}"
        );
        assert!(
            child.log_tail().contains("going away"),
            "{}",
            child.log_tail()
        );
    }

    #[tokio::test]
    async fn a_child_that_never_gets_ready_times_out_and_is_killed_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let mut child = spawn_sh(dir.path(), "exec sleep 600");
        let err = wait_never_ready(&mut child, Duration::from_millis(50)).await;
        assert!(matches!(err, NotReady::TimedOut { .. }), "{err}");
        let pid = child.id();
        drop(child);
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "the child is reaped on drop"
        );
    }

    #[test]
    fn a_missing_executable_is_a_spawn_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let err = LoggedChild::spawn(
            &mut Command::new("/nonexistent/binary"),
            &dir.path().join("x.log"),
        )
        .unwrap_err();
        assert!(
            matches!(&err, SpawnLoggedError::Spawn { binary, .. } if binary == Path::new("/nonexistent/binary")),
            "{err}"
        );
    }
}
