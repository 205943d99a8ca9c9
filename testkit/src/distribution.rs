//! A real distribution registry (Debian `docker-registry`, distribution 2.8.2) on 127.0.0.1.
//!
//! Each [`Distribution`] owns a private temp directory holding its config file, its storage root
//! and its log, listens on a free loopback port, and is killed (and reaped) when dropped, after
//! which the temp directory is removed. `REGISTRY_*` variables are removed from the child's
//! environment because distribution lets them override the config file.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::client::{http_client, BuildClientError};
use crate::process::{
    create_dir, private_dir, write_file, LoggedChild, NotReady, SetUpDirError, SpawnLoggedError,
};
use crate::wait::{free_port, FindFreePortError};

/// Where Debian installs distribution.
pub const DEFAULT_BINARY: &str = "/usr/bin/docker-registry";

/// How a [`Distribution`] should run.
#[derive(Debug, Clone)]
pub struct DistributionOptions {
    /// The `docker-registry` executable.
    pub binary: PathBuf,
    /// `Some(url)` runs distribution as a pull-through proxy of `url` (`proxy.remoteurl`).
    pub proxy_remote_url: Option<String>,
    /// Credentials distribution's proxy sends upstream (`proxy.username` / `proxy.password`).
    pub proxy_credentials: Option<(String, String)>,
    /// distribution's `log.level` (`error`, `warn`, `info`, `debug`).
    pub log_level: String,
    /// How long to wait for `GET /v2/` to answer after the start.
    pub start_timeout: Duration,
}

impl Default for DistributionOptions {
    fn default() -> Self {
        Self {
            binary: PathBuf::from(DEFAULT_BINARY),
            proxy_remote_url: None,
            proxy_credentials: None,
            log_level: "warn".to_owned(),
            start_timeout: Duration::from_secs(20),
        }
    }
}

/// Why a [`Distribution`] could not be started.
#[derive(Debug, thiserror::Error)]
pub enum StartDistributionError {
    /// The executable is not installed.
    #[error(
        "{binary} not found: run scripts/install-test-deps to install the docker-registry package"
    )]
    BinaryMissing {
        /// The path that was looked for.
        binary: PathBuf,
    },
    /// Its private directory could not be set up.
    #[error(transparent)]
    SetUpDir(#[from] SetUpDirError),
    /// No free port.
    #[error(transparent)]
    FindPort(#[from] FindFreePortError),
    /// The HTTP client for the readiness probe could not be built.
    #[error(transparent)]
    BuildClient(#[from] BuildClientError),
    /// The process could not be started.
    #[error(transparent)]
    Spawn(#[from] SpawnLoggedError),
    /// The process exited or did not answer `GET /v2/` in time.
    #[error("distribution on {addr} did not answer GET /v2/: {source}; log:\n{log}")]
    NotReady {
        /// Where it should listen.
        addr: SocketAddr,
        /// Why it is not ready.
        source: NotReady,
        /// The tail of its log.
        log: String,
    },
}

/// A running distribution registry; killed and cleaned up on drop.
#[derive(Debug)]
pub struct Distribution {
    // Before `dir`: the process is reaped before its temp dir is removed.
    child: LoggedChild,
    addr: SocketAddr,
    dir: tempfile::TempDir,
}

/// Start attempts: a port picked by [`free_port`] can be taken before the child binds it.
const START_ATTEMPTS: u32 = 3;

impl Distribution {
    /// Starts a plain (non-proxy) registry with default options.
    ///
    /// # Errors
    /// See [`StartDistributionError`].
    pub async fn start() -> Result<Self, StartDistributionError> {
        Self::start_with(DistributionOptions::default()).await
    }

    /// Starts distribution as a pull-through proxy of `remote_url`.
    ///
    /// # Errors
    /// See [`StartDistributionError`].
    pub async fn start_proxy(remote_url: &str) -> Result<Self, StartDistributionError> {
        Self::start_with(DistributionOptions {
            proxy_remote_url: Some(remote_url.to_owned()),
            ..DistributionOptions::default()
        })
        .await
    }

    /// Starts distribution with explicit options.
    ///
    /// # Errors
    /// See [`StartDistributionError`].
    pub async fn start_with(options: DistributionOptions) -> Result<Self, StartDistributionError> {
        if !options.binary.is_file() {
            return Err(StartDistributionError::BinaryMissing {
                binary: options.binary,
            });
        }
        let mut last_error = None;
        for _ in 0..START_ATTEMPTS {
            match Self::try_start(&options).await {
                Ok(registry) => return Ok(registry),
                Err(error) if port_taken(&error) => last_error = Some(error),
                Err(other) => return Err(other),
            }
        }
        Err(
            last_error.unwrap_or(StartDistributionError::FindPort(FindFreePortError::Bind {
                source: std::io::Error::other("no start attempt made"),
            })),
        )
    }

    async fn try_start(options: &DistributionOptions) -> Result<Self, StartDistributionError> {
        let dir = private_dir("cachalot-distribution-")?;
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()?));
        let storage = dir.path().join("storage");
        let config_path = dir.path().join("config.yml");
        create_dir(&storage)?;
        write_file(&config_path, render_config(addr, &storage, options))?;
        let mut command = Command::new(&options.binary);
        command.arg("serve").arg(&config_path);
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("REGISTRY_") {
                command.env_remove(key);
            }
        }
        let child = LoggedChild::spawn(&mut command, &dir.path().join("registry.log"))?;
        let mut registry = Self { child, addr, dir };
        registry.wait_ready(options.start_timeout).await?;
        Ok(registry)
    }

    async fn wait_ready(&mut self, timeout: Duration) -> Result<(), StartDistributionError> {
        let client = http_client()?;
        let url = format!("{}/v2/", self.url());
        let answered = self
            .child
            .wait_ready(timeout, Duration::from_millis(20), || {
                let request = client.get(&url).timeout(Duration::from_secs(2)).send();
                async move { request.await.is_ok() }
            })
            .await;
        answered.map_err(|source| StartDistributionError::NotReady {
            addr: self.addr,
            source,
            log: self.log_tail(),
        })
    }

    /// `http://127.0.0.1:PORT`, without a trailing slash.
    #[must_use]
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The socket address it listens on.
    #[must_use]
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `127.0.0.1:PORT`, the form image references and hosts.toml use.
    #[must_use]
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    /// Its storage root (`storage.filesystem.rootdirectory`).
    #[must_use]
    pub fn storage_dir(&self) -> PathBuf {
        self.dir.path().join("storage")
    }

    /// Its combined stdout/stderr log file.
    #[must_use]
    pub fn log_path(&self) -> PathBuf {
        self.child.log_path().to_owned()
    }

    /// The last 4 KiB of its log, for error messages.
    #[must_use]
    pub fn log_tail(&self) -> String {
        self.child.log_tail()
    }

    /// Its process id.
    #[must_use]
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

/// Whether distribution exited because another process bound its port first.
fn port_taken(error: &StartDistributionError) -> bool {
    matches!(
        error,
        StartDistributionError::NotReady { source: NotReady::Exited { .. }, log, .. }
            if log.contains("address already in use")
    )
}

/// Quotes a string as a YAML double-quoted scalar (JSON string syntax is valid YAML).
fn yaml_str(value: &str) -> String {
    serde_json::Value::String(value.to_owned()).to_string()
}

/// Renders distribution's config file.
#[must_use]
pub fn render_config(addr: SocketAddr, storage: &Path, options: &DistributionOptions) -> String {
    let mut config = format!(
        "version: 0.1\n\
         log:\n  level: {level}\n  accesslog:\n    disabled: true\n\
         storage:\n  filesystem:\n    rootdirectory: {storage}\n  delete:\n    enabled: true\n  \
         maintenance:\n    uploadpurging:\n      enabled: false\n\
         http:\n  addr: {addr}\n  secret: cachalot-testkit-secret\n\
         health:\n  storagedriver:\n    enabled: false\n",
        level = yaml_str(&options.log_level),
        storage = yaml_str(&storage.to_string_lossy()),
        addr = yaml_str(&addr.to_string()),
    );
    if let Some(remote) = &options.proxy_remote_url {
        config.push_str(&format!("proxy:\n  remoteurl: {}\n", yaml_str(remote)));
        if let Some((user, password)) = &options.proxy_credentials {
            config.push_str(&format!(
                "  username: {}\n  password: {}\n",
                yaml_str(user),
                yaml_str(password)
            ));
        }
    }
    config
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    #[test]
    fn proxy_options_render_a_remoteurl() {
        let options = DistributionOptions {
            proxy_remote_url: Some("http://127.0.0.1:9".to_owned()),
            ..DistributionOptions::default()
        };
        let config = render_config(
            "127.0.0.1:5000".parse().unwrap(),
            Path::new("/tmp/s"),
            &options,
        );
        assert!(
            config.contains("proxy:\n  remoteurl: \"http://127.0.0.1:9\"\n"),
            "{config}"
        );
        assert!(config.contains("addr: \"127.0.0.1:5000\""), "{config}");
    }

    #[test]
    fn plain_options_render_no_proxy_section() {
        let config = render_config(
            "127.0.0.1:5000".parse().unwrap(),
            Path::new("/tmp/s"),
            &DistributionOptions::default(),
        );
        assert!(!config.contains("proxy:"), "{config}");
        assert!(config.contains("rootdirectory: \"/tmp/s\""), "{config}");
    }

    #[tokio::test]
    async fn a_missing_binary_points_at_the_install_script() {
        let err = Distribution::start_with(DistributionOptions {
            binary: PathBuf::from("/nonexistent/docker-registry"),
            ..DistributionOptions::default()
        })
        .await
        .unwrap_err();
        assert!(
            err.to_string().contains("scripts/install-test-deps"),
            "{err}"
        );
    }
}
