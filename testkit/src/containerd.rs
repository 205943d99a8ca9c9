//! A private containerd (Debian 1.6.20) on a unix socket under a temp dir, driven with `ctr`.
//!
//! Invariants: root, state, sockets and the opt dir all live in the instance's temp dir, the CRI
//! plugin is disabled (pulls need no CRI), the process is killed and reaped on drop before the
//! temp dir is removed, and every `ctr` call has a timeout and is killed when it expires.
//! containerd needs root; the harness runs as root.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::Duration;

use crate::process::{
    private_dir, write_file, LoggedChild, NotReady, SetUpDirError, SpawnLoggedError,
};

/// Where Debian installs containerd.
pub const DEFAULT_CONTAINERD: &str = "/usr/bin/containerd";
/// Where Debian installs ctr.
pub const DEFAULT_CTR: &str = "/usr/bin/ctr";

/// How a [`Containerd`] should run.
#[derive(Debug, Clone)]
pub struct ContainerdOptions {
    /// The containerd executable.
    pub containerd: PathBuf,
    /// The ctr executable.
    pub ctr: PathBuf,
    /// The containerd namespace `ctr` uses (`-n`).
    pub namespace: String,
    /// Snapshotter for unpacking pulls; `native` works on any filesystem without mounts.
    pub snapshotter: Option<String>,
    /// How long to wait for `ctr version` to answer after the start.
    pub start_timeout: Duration,
    /// Timeout of each `ctr` command.
    pub command_timeout: Duration,
    /// `Some(dir)` writes the CRI registry `config_path = dir` into the config, as a node set up
    /// for hosts.toml files has it. CRI stays disabled: this is for tools that read the config
    /// (the node agent's check), `ctr --hosts-dir` does not need it.
    pub cri_registry_config_path: Option<PathBuf>,
    /// Run containerd inside this network namespace (`nsenter --net=/run/netns/NAME`), as a
    /// test cluster's node does; `ctr` still reaches it through its unix socket.
    pub netns: Option<String>,
    /// Write the config here instead of into the private dir (a node's `/etc/containerd/config.toml`
    /// under its node root, where the node agent reads it).
    pub config_file: Option<PathBuf>,
}

impl Default for ContainerdOptions {
    fn default() -> Self {
        Self {
            containerd: PathBuf::from(DEFAULT_CONTAINERD),
            ctr: PathBuf::from(DEFAULT_CTR),
            namespace: "test".to_owned(),
            snapshotter: Some("native".to_owned()),
            start_timeout: Duration::from_secs(20),
            command_timeout: Duration::from_secs(120),
            cri_registry_config_path: None,
            netns: None,
            config_file: None,
        }
    }
}

/// Why containerd could not be started.
#[derive(Debug, thiserror::Error)]
pub enum StartContainerdError {
    /// An executable is not installed.
    #[error("{binary} not found: run scripts/install-test-deps to install the containerd package")]
    BinaryMissing {
        /// The path looked for.
        binary: PathBuf,
    },
    /// Its private directory could not be set up.
    #[error(transparent)]
    SetUpDir(#[from] SetUpDirError),
    /// The process could not be started.
    #[error(transparent)]
    Spawn(#[from] SpawnLoggedError),
    /// containerd exited or did not answer `ctr version` in time.
    #[error("containerd did not answer `ctr version`: {source}; log:\n{log}")]
    NotReady {
        /// Why it is not ready.
        source: NotReady,
        /// Tail of its log.
        log: String,
    },
}

/// Why a `ctr` command could not be run to completion.
#[derive(Debug, thiserror::Error)]
pub enum RunCtrError {
    /// ctr could not be spawned.
    #[error("spawn {ctr}")]
    Spawn {
        /// The executable.
        ctr: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// ctr did not finish in time and was killed.
    #[error("ctr {args} did not finish within {timeout:?}")]
    TimedOut {
        /// The arguments.
        args: String,
        /// The timeout.
        timeout: Duration,
    },
    /// ctr exited non-zero (only from [`CtrOutput::into_success`]).
    #[error("ctr {args} failed ({status}): {stderr}")]
    Failed {
        /// The arguments.
        args: String,
        /// Exit status.
        status: ExitStatus,
        /// Its stderr.
        stderr: String,
    },
}

/// What a `ctr` command printed and how it exited.
#[derive(Debug, Clone)]
pub struct CtrOutput {
    /// The arguments after `--address SOCK -n NS`.
    pub args: Vec<String>,
    /// Exit status.
    pub status: ExitStatus,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

impl CtrOutput {
    /// Whether ctr exited 0.
    #[must_use]
    pub fn success(&self) -> bool {
        self.status.success()
    }

    /// `Ok(self)` if ctr exited 0, else [`RunCtrError::Failed`] carrying stderr.
    ///
    /// # Errors
    /// [`RunCtrError::Failed`] on a non-zero exit.
    pub fn into_success(self) -> Result<Self, RunCtrError> {
        if self.success() {
            Ok(self)
        } else {
            Err(RunCtrError::Failed {
                args: self.args.join(" "),
                status: self.status,
                stderr: self.stderr,
            })
        }
    }
}

/// A running private containerd; killed and cleaned up on drop.
#[derive(Debug)]
pub struct Containerd {
    // Before `dir`: the process is reaped before its temp dir is removed.
    child: LoggedChild,
    dir: tempfile::TempDir,
    options: ContainerdOptions,
}

impl Containerd {
    /// Starts containerd with default options.
    ///
    /// # Errors
    /// See [`StartContainerdError`].
    pub async fn start() -> Result<Self, StartContainerdError> {
        Self::start_with(ContainerdOptions::default()).await
    }

    /// Starts containerd with explicit options.
    ///
    /// # Errors
    /// See [`StartContainerdError`].
    pub async fn start_with(options: ContainerdOptions) -> Result<Self, StartContainerdError> {
        for binary in [&options.containerd, &options.ctr] {
            if !binary.is_file() {
                return Err(StartContainerdError::BinaryMissing {
                    binary: binary.clone(),
                });
            }
        }
        let dir = private_dir("ctrd-")?;
        let config_path = options
            .config_file
            .clone()
            .unwrap_or_else(|| dir.path().join("config.toml"));
        let config = render_config(dir.path(), options.cri_registry_config_path.as_deref());
        write_file(&config_path, config)?;
        let mut command = match &options.netns {
            Some(netns) => {
                let mut command = Command::new("nsenter");
                command
                    .arg(format!("--net=/run/netns/{netns}"))
                    .arg("--")
                    .arg(&options.containerd);
                command
            }
            None => Command::new(&options.containerd),
        };
        command.arg("--config").arg(&config_path);
        let child = LoggedChild::spawn(&mut command, &dir.path().join("containerd.log"))?;
        let mut containerd = Self {
            child,
            dir,
            options,
        };
        containerd.wait_ready().await?;
        Ok(containerd)
    }

    async fn wait_ready(&mut self) -> Result<(), StartContainerdError> {
        let socket = self.socket();
        let ctr = self.options.ctr.clone();
        let answered = self
            .child
            .wait_ready(
                self.options.start_timeout,
                Duration::from_millis(50),
                || {
                    let (socket, ctr) = (socket.clone(), ctr.clone());
                    async move {
                        if !socket.exists() {
                            return false;
                        }
                        let version = tokio::process::Command::new(&ctr)
                            .arg("--address")
                            .arg(&socket)
                            .arg("version")
                            .stdin(Stdio::null())
                            .stdout(Stdio::null())
                            .stderr(Stdio::null())
                            .kill_on_drop(true)
                            .status()
                            .await;
                        version.is_ok_and(|status| status.success())
                    }
                },
            )
            .await;
        answered.map_err(|source| StartContainerdError::NotReady {
            source,
            log: self.log_tail(),
        })
    }

    /// The gRPC socket (`ctr --address`).
    #[must_use]
    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("c.sock")
    }

    /// The instance's temp dir (config, root, state, log).
    #[must_use]
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The last 4 KiB of containerd's log.
    #[must_use]
    pub fn log_tail(&self) -> String {
        self.child.log_tail()
    }

    /// Its config file.
    #[must_use]
    pub fn config_path(&self) -> PathBuf {
        self.options
            .config_file
            .clone()
            .unwrap_or_else(|| self.dir.path().join("config.toml"))
    }

    /// Runs `ctr --address SOCK -n NS ARGS...` with the command timeout. A non-zero exit is
    /// returned as output, not as an error: tests often expect failures.
    ///
    /// # Errors
    /// [`RunCtrError::Spawn`] or [`RunCtrError::TimedOut`].
    pub async fn ctr<S: AsRef<str>>(&self, args: &[S]) -> Result<CtrOutput, RunCtrError> {
        let args: Vec<String> = args.iter().map(|a| a.as_ref().to_owned()).collect();
        let child = tokio::process::Command::new(&self.options.ctr)
            .arg("--address")
            .arg(self.socket())
            .arg("-n")
            .arg(&self.options.namespace)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|source| RunCtrError::Spawn {
                ctr: self.options.ctr.clone(),
                source,
            })?;
        let output = tokio::time::timeout(self.options.command_timeout, child.wait_with_output())
            .await
            .map_err(|_| RunCtrError::TimedOut {
                args: args.join(" "),
                timeout: self.options.command_timeout,
            })?
            .map_err(|source| RunCtrError::Spawn {
                ctr: self.options.ctr.clone(),
                source,
            })?;
        Ok(CtrOutput {
            args,
            status: output.status,
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        })
    }

    /// `ctr images pull --hosts-dir DIR [--snapshotter S] IMAGE`: resolves, fetches and unpacks
    /// for the host platform. Plain-HTTP hosts come from `http://` entries in hosts.toml, so no
    /// `--plain-http` is needed.
    ///
    /// # Errors
    /// See [`RunCtrError`]; a failed pull is `Ok` with a non-zero status.
    pub async fn pull(&self, image_ref: &str, hosts_dir: &Path) -> Result<CtrOutput, RunCtrError> {
        let mut args = vec![
            "images".to_owned(),
            "pull".to_owned(),
            "--hosts-dir".to_owned(),
            hosts_dir.to_string_lossy().into_owned(),
        ];
        if let Some(snapshotter) = &self.options.snapshotter {
            args.push("--snapshotter".to_owned());
            args.push(snapshotter.clone());
        }
        args.push(image_ref.to_owned());
        self.ctr(&args).await
    }

    /// `ctr content fetch --hosts-dir DIR IMAGE`: downloads without unpacking.
    ///
    /// # Errors
    /// See [`RunCtrError`]; a failed fetch is `Ok` with a non-zero status.
    pub async fn fetch(&self, image_ref: &str, hosts_dir: &Path) -> Result<CtrOutput, RunCtrError> {
        self.ctr(&[
            "content",
            "fetch",
            "--hosts-dir",
            &hosts_dir.to_string_lossy(),
            image_ref,
        ])
        .await
    }

    /// `ctr images rm --sync IMAGE`: removes the image and garbage-collects its content, so the
    /// next pull downloads everything again.
    ///
    /// # Errors
    /// See [`RunCtrError`].
    pub async fn remove(&self, image_ref: &str) -> Result<CtrOutput, RunCtrError> {
        self.ctr(&["images", "rm", "--sync", image_ref]).await
    }

    /// Removes `image_ref` with its content ([`Self::remove`], which must succeed) and pulls it
    /// again, so every blob is downloaded anew.
    ///
    /// # Errors
    /// See [`RunCtrError`]; a failed pull is `Ok` with a non-zero status.
    pub async fn pull_again(
        &self,
        image_ref: &str,
        hosts_dir: &Path,
    ) -> Result<CtrOutput, RunCtrError> {
        self.remove(image_ref).await?.into_success()?;
        self.pull(image_ref, hosts_dir).await
    }

    /// The image names known to this namespace (`ctr images ls -q`).
    ///
    /// # Errors
    /// See [`RunCtrError`].
    pub async fn images(&self) -> Result<Vec<String>, RunCtrError> {
        let output = self.ctr(&["images", "ls", "-q"]).await?.into_success()?;
        Ok(output.stdout.lines().map(str::to_owned).collect())
    }

    /// The content digests containerd holds (`ctr content ls -q`).
    ///
    /// # Errors
    /// See [`RunCtrError`].
    pub async fn content_digests(&self) -> Result<Vec<String>, RunCtrError> {
        let output = self.ctr(&["content", "ls", "-q"]).await?.into_success()?;
        Ok(output.stdout.lines().map(str::to_owned).collect())
    }
}

/// Renders containerd's config (version 2) with everything under `dir` and, when given, the CRI
/// registry `config_path`. Pure.
#[must_use]
pub fn render_config(dir: &Path, cri_registry_config_path: Option<&Path>) -> String {
    let d = dir.to_string_lossy();
    let mut config = format!(
        "version = 2\n\
         root = \"{d}/root\"\n\
         state = \"{d}/state\"\n\
         disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\
         [grpc]\n  address = \"{d}/c.sock\"\n\
         [ttrpc]\n  address = \"{d}/c.sock.ttrpc\"\n\
         [debug]\n  address = \"{d}/debug.sock\"\n\
         [plugins.\"io.containerd.internal.v1.opt\"]\n  path = \"{d}/opt\"\n"
    );
    if let Some(certs_dir) = cri_registry_config_path {
        config.push_str(&format!(
            "[plugins.\"io.containerd.grpc.v1.cri\".registry]\n  config_path = \"{}\"\n",
            certs_dir.to_string_lossy()
        ));
    }
    config
}

/// Renders a hosts.toml: `server` is the fallback, each mirror a `[host."URL"]` with pull and
/// resolve capabilities. Pure.
///
/// With no mirrors the server is also written as a `[host]` entry: containerd 1.6.20 rejects a
/// hosts.toml without any `[host]` table ("invalid `host` tree") and then silently falls back to
/// the registry's default host (`registry-1.docker.io` for docker.io), which a hermetic test must
/// never contact.
#[must_use]
pub fn render_hosts_toml(server: &str, mirrors: &[&str]) -> String {
    let mut text = format!("server = \"{server}\"\n");
    let server_only = [server];
    let hosts = if mirrors.is_empty() {
        &server_only[..]
    } else {
        mirrors
    };
    for mirror in hosts {
        text.push_str(&format!(
            "\n[host.\"{mirror}\"]\n  capabilities = [\"pull\", \"resolve\"]\n  dial_timeout = \"1s\"\n"
        ));
    }
    text
}

/// Writes `HOSTS_DIR/REGISTRY/hosts.toml` (see [`render_hosts_toml`]) and returns its path.
///
/// # Errors
/// The I/O error when the directory or file cannot be written.
pub fn write_hosts_toml(
    hosts_dir: &Path,
    registry: &str,
    server: &str,
    mirrors: &[&str],
) -> std::io::Result<PathBuf> {
    let dir = hosts_dir.join(registry);
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("hosts.toml");
    std::fs::write(&path, render_hosts_toml(server, mirrors))?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    #[test]
    fn hosts_toml_lists_server_and_each_mirror_with_pull_and_resolve() {
        let text = render_hosts_toml("http://127.0.0.1:1", &["http://127.0.0.1:2"]);
        let parsed: toml::Value = text.parse().unwrap();
        assert_eq!(parsed["server"].as_str(), Some("http://127.0.0.1:1"));
        let host = &parsed["host"]["http://127.0.0.1:2"];
        assert_eq!(host["capabilities"][0].as_str(), Some("pull"));
        assert_eq!(host["capabilities"][1].as_str(), Some("resolve"));
    }

    #[test]
    fn a_server_only_hosts_toml_still_has_a_host_table() {
        let text = render_hosts_toml("http://127.0.0.1:1", &[]);
        let parsed: toml::Value = text.parse().unwrap();
        assert!(parsed["host"].get("http://127.0.0.1:1").is_some(), "{text}");
    }

    #[test]
    fn containerd_config_keeps_everything_under_the_temp_dir() {
        let text = render_config(Path::new("/tmp/x"), None);
        let parsed: toml::Value = text.parse().unwrap();
        assert_eq!(parsed["root"].as_str(), Some("/tmp/x/root"));
        assert_eq!(parsed["grpc"]["address"].as_str(), Some("/tmp/x/c.sock"));
        assert_eq!(
            parsed["disabled_plugins"][0].as_str(),
            Some("io.containerd.grpc.v1.cri")
        );
        assert!(!text.contains("config_path"), "{text}");
    }

    #[test]
    fn a_cri_registry_config_path_is_written_for_tools_that_check_it() {
        let text = render_config(Path::new("/tmp/x"), Some(Path::new("/tmp/x/certs.d")));
        let parsed: toml::Value = text.parse().unwrap();
        assert_eq!(
            parsed["plugins"]["io.containerd.grpc.v1.cri"]["registry"]["config_path"].as_str(),
            Some("/tmp/x/certs.d")
        );
        assert_eq!(
            parsed["plugins"]["io.containerd.internal.v1.opt"]["path"].as_str(),
            Some("/tmp/x/opt")
        );
    }
}
