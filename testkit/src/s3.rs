//! A real S3-compatible object store on 127.0.0.1: Garage 2.5.0, built once by `scripts/s3-server`.
//!
//! [`Garage::start`] runs `garage server --single-node --default-bucket` in a private temp dir
//! (config file, sqlite metadata, data blocks, logs), on two free loopback ports (the S3 API and
//! Garage's RPC), with a fixed test key that owns one bucket. It returns once the S3 port answers
//! HTTP; Garage creates the key and the bucket before it opens that port, so the bucket is usable
//! then.
//!
//! Invariants: the server listens on 127.0.0.1 only; its config file is mode 0600 (Garage refuses
//! a world-readable secret) and holds a fresh random `rpc_secret`; the process is killed and
//! reaped when the handle drops, before its temp dir is removed. [`Garage::restart`] reuses the
//! same dirs and ports, so objects survive it, and waits for the old process to exit first.
//!
//! Caveat: Garage 2.5.0 ignores `If-None-Match` / `If-Match` on PUT (a conditional PUT silently
//! overwrites), so nothing tested here may rely on S3 conditional writes.

use std::io::Read;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::client::{http_client, BuildClientError};
use crate::process::{
    create_dir, private_dir, LoggedChild, NotReady, SetUpDirError, SpawnLoggedError,
};
use crate::wait::{free_port, wait_for, FindFreePortError};

/// Environment variable naming the directory that holds the `garage` executable (what
/// `scripts/s3-server` prints).
pub const S3_SERVER_BIN_ENV: &str = "CACHALOT_S3_SERVER_BIN";
/// The Garage release `scripts/s3-server` builds.
pub const GARAGE_VERSION: &str = "2.5.0";
/// The access key id of the test key (Garage: 8 or more of `[A-Za-z0-9-_.]`).
pub const ACCESS_KEY_ID: &str = "GKcachalot0000000000000000";
/// The secret of the test key (Garage: 16 or more printable ASCII characters).
pub const SECRET_ACCESS_KEY: &str =
    "cachalot-test-secret-0123456789abcdef0123456789abcdef0123456789ab";
/// The bucket Garage creates at start, owned by the test key.
pub const BUCKET: &str = "cachalot";
/// The region Garage is configured with (`s3_region`); SigV4 signatures must use it.
pub const REGION: &str = "garage";

/// How long to wait for the S3 port after a start (Garage answers after ~0.2-0.5 s).
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a stopped Garage may take to exit after SIGTERM before SIGKILL. With no client
/// connected it exits in ~1 s; a client holding an idle keep-alive connection (object_store's
/// pool does) keeps its graceful shutdown waiting indefinitely, so this is short. SIGKILL loses
/// nothing that was acknowledged (sqlite metadata, data blocks written before the reply).
const STOP_TIMEOUT: Duration = Duration::from_secs(2);
/// Start attempts: a port picked by [`free_port`] can be taken before Garage binds it.
const START_ATTEMPTS: u32 = 3;

/// Why Garage could not be started (or restarted).
#[derive(Debug, thiserror::Error)]
pub enum StartGarageError {
    /// The `garage` executable is not there.
    #[error("{binary} not found: run scripts/s3-server (scripts/test does) and set {S3_SERVER_BIN_ENV} to the directory it prints")]
    BinaryMissing {
        /// The path that was looked for.
        binary: PathBuf,
    },
    /// Its private directory could not be set up.
    #[error(transparent)]
    SetUpDir(#[from] SetUpDirError),
    /// The random `rpc_secret` could not be read from `/dev/urandom`.
    #[error("read a random rpc_secret from /dev/urandom")]
    Random {
        /// The I/O error.
        source: std::io::Error,
    },
    /// No free port.
    #[error(transparent)]
    FindPort(#[from] FindFreePortError),
    /// The HTTP client for the readiness probe could not be built.
    #[error(transparent)]
    BuildClient(#[from] BuildClientError),
    /// The process could not be started.
    #[error(transparent)]
    Spawn(#[from] SpawnLoggedError),
    /// The previous process (on a restart) could not be stopped.
    #[error(transparent)]
    Stop(#[from] StopGarageError),
    /// The process exited or its S3 port did not answer in time.
    #[error("garage S3 API on {addr} did not answer: {source}; log:\n{log}")]
    NotReady {
        /// The S3 API address.
        addr: SocketAddr,
        /// Why it is not ready.
        source: NotReady,
        /// The tail of its log.
        log: String,
    },
}

/// Why Garage could not be stopped.
#[derive(Debug, thiserror::Error)]
pub enum StopGarageError {
    /// Sending SIGTERM, SIGKILL or reaping the process failed.
    #[error("stop garage (pid {pid})")]
    Signal {
        /// Its process id.
        pid: u32,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// The `garage` executable: `$CACHALOT_S3_SERVER_BIN/garage`, else where `scripts/s3-server`
/// puts it (`${CACHALOT_CACHE_DIR:-${XDG_CACHE_HOME:-~/.cache}/cachalot}/garage-2.5.0/bin`).
/// Never builds anything.
///
/// # Errors
/// [`StartGarageError::BinaryMissing`] when it is not there.
pub fn garage_binary() -> Result<PathBuf, StartGarageError> {
    let dir = std::env::var_os(S3_SERVER_BIN_ENV)
        .map(PathBuf::from)
        .unwrap_or_else(default_bin_dir);
    let binary = dir.join("garage");
    if binary.is_file() {
        Ok(binary)
    } else {
        Err(StartGarageError::BinaryMissing { binary })
    }
}

/// `scripts/s3-server dir`, computed without running it.
fn default_bin_dir() -> PathBuf {
    let env_dir = |name| {
        std::env::var_os(name)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    let cache = env_dir("CACHALOT_CACHE_DIR").unwrap_or_else(|| {
        env_dir("XDG_CACHE_HOME")
            .or_else(|| env_dir("HOME").map(|home| home.join(".cache")))
            .unwrap_or_else(|| PathBuf::from(".cache"))
            .join("cachalot")
    });
    cache.join(format!("garage-{GARAGE_VERSION}")).join("bin")
}

/// A running single-node Garage; killed and cleaned up on drop.
#[derive(Debug)]
pub struct Garage {
    // Before `dir`: the process is reaped before its temp dir is removed.
    child: Option<LoggedChild>,
    binary: PathBuf,
    s3_addr: SocketAddr,
    rpc_addr: SocketAddr,
    starts: u32,
    dir: tempfile::TempDir,
}

impl Garage {
    /// Starts Garage with the binary from [`garage_binary`].
    ///
    /// # Errors
    /// See [`StartGarageError`].
    pub async fn start() -> Result<Self, StartGarageError> {
        Self::start_with_binary(garage_binary()?).await
    }

    /// Starts Garage with an explicit `garage` executable.
    ///
    /// # Errors
    /// See [`StartGarageError`].
    pub async fn start_with_binary(binary: PathBuf) -> Result<Self, StartGarageError> {
        if !binary.is_file() {
            return Err(StartGarageError::BinaryMissing { binary });
        }
        let mut last_error = None;
        for _ in 0..START_ATTEMPTS {
            match Self::try_start(&binary).await {
                Ok(garage) => return Ok(garage),
                Err(error) if port_taken(&error) => last_error = Some(error),
                Err(other) => return Err(other),
            }
        }
        Err(
            last_error.unwrap_or(StartGarageError::FindPort(FindFreePortError::Bind {
                source: std::io::Error::other("no start attempt made"),
            })),
        )
    }

    async fn try_start(binary: &Path) -> Result<Self, StartGarageError> {
        let dir = private_dir("cachalot-garage-")?;
        let s3_addr = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()?));
        let rpc_addr = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()?));
        create_dir(&dir.path().join("meta"))?;
        create_dir(&dir.path().join("data"))?;
        let config = render_config(dir.path(), s3_addr, rpc_addr, &random_secret()?);
        write_private_file(&dir.path().join("garage.toml"), &config)?;
        let mut garage = Self {
            child: None,
            binary: binary.to_owned(),
            s3_addr,
            rpc_addr,
            starts: 0,
            dir,
        };
        garage.spawn_and_wait().await?;
        Ok(garage)
    }

    async fn spawn_and_wait(&mut self) -> Result<(), StartGarageError> {
        self.starts += 1;
        let mut command = Command::new(&self.binary);
        command
            .arg("-c")
            .arg(self.config_path())
            .args(["server", "--single-node", "--default-bucket"])
            .env("GARAGE_DEFAULT_ACCESS_KEY", ACCESS_KEY_ID)
            .env("GARAGE_DEFAULT_SECRET_KEY", SECRET_ACCESS_KEY)
            .env("GARAGE_DEFAULT_BUCKET", BUCKET)
            .env("RUST_LOG", "garage=info")
            .env_remove("GARAGE_CONFIG_FILE")
            .current_dir(self.dir.path());
        let log = self.dir.path().join(format!("garage-{}.log", self.starts));
        let child = self.child.insert(LoggedChild::spawn(&mut command, &log)?);
        let client = http_client()?;
        let url = format!("http://{}/", self.s3_addr);
        // Any HTTP answer (403 to an anonymous request) means the S3 API is listening, which
        // Garage does only after it created the default key and bucket.
        let answered = child
            .wait_ready(START_TIMEOUT, Duration::from_millis(10), || {
                let request = client.get(&url).timeout(Duration::from_secs(2)).send();
                async move { request.await.is_ok() }
            })
            .await;
        answered.map_err(|source| StartGarageError::NotReady {
            addr: self.s3_addr,
            source,
            log: self.log_tail(),
        })
    }

    /// Stops Garage: SIGTERM, then waits up to 2 s for the process to exit, then SIGKILL. The
    /// dirs and ports stay reserved for [`Garage::restart`]. Stopping a stopped Garage is a no-op.
    ///
    /// # Errors
    /// See [`StopGarageError`].
    pub async fn stop(&mut self) -> Result<(), StopGarageError> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        let pid = child.id();
        let signal_error = |source| StopGarageError::Signal { pid, source };
        if child.try_wait().map_err(signal_error)?.is_some() {
            return Ok(());
        }
        // `kill` rather than a libc call: the workspace forbids unsafe code.
        let term = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .map_err(signal_error)?;
        if term.success() {
            let exited = wait_for(STOP_TIMEOUT, Duration::from_millis(20), || {
                let state = child.try_wait();
                async move {
                    match state {
                        Ok(None) => None,
                        Ok(Some(_)) => Some(Ok(())),
                        Err(error) => Some(Err(error)),
                    }
                }
            })
            .await;
            match exited {
                Ok(result) => return result.map_err(signal_error),
                Err(_timed_out) => {}
            }
        }
        child.kill().map_err(signal_error)?;
        Ok(())
    }

    /// Stops Garage (waiting for the old process to exit) and starts it again on the same dirs
    /// and ports: objects, the key and the bucket are kept.
    ///
    /// # Errors
    /// See [`StartGarageError`].
    pub async fn restart(&mut self) -> Result<(), StartGarageError> {
        self.stop().await?;
        self.spawn_and_wait().await
    }

    /// The S3 endpoint, `http://127.0.0.1:PORT` (path-style requests, no trailing slash).
    #[must_use]
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.s3_addr)
    }

    /// The S3 API's socket address.
    #[must_use]
    pub fn s3_addr(&self) -> SocketAddr {
        self.s3_addr
    }

    /// Garage's RPC socket address.
    #[must_use]
    pub fn rpc_addr(&self) -> SocketAddr {
        self.rpc_addr
    }

    /// The bucket created at start.
    #[must_use]
    pub fn bucket(&self) -> &'static str {
        BUCKET
    }

    /// The region to sign requests for (`garage`).
    #[must_use]
    pub fn region(&self) -> &'static str {
        REGION
    }

    /// The access key id that owns the bucket.
    #[must_use]
    pub fn access_key_id(&self) -> &'static str {
        ACCESS_KEY_ID
    }

    /// The secret access key of [`Garage::access_key_id`].
    #[must_use]
    pub fn secret_access_key(&self) -> &'static str {
        SECRET_ACCESS_KEY
    }

    /// Where Garage stores data blocks (`data_dir`); metadata is in its sibling `meta`.
    #[must_use]
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// The config file (`garage -c` for CLI commands against this node).
    #[must_use]
    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("garage.toml")
    }

    /// The log file of the current (or last) run.
    #[must_use]
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join(format!("garage-{}.log", self.starts))
    }

    /// The last 4 KiB of the current run's log, for error messages.
    #[must_use]
    pub fn log_tail(&self) -> String {
        self.child
            .as_ref()
            .map(LoggedChild::log_tail)
            .unwrap_or_default()
    }

    /// Its process id, while it runs.
    #[must_use]
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(LoggedChild::id)
    }
}

/// Whether Garage exited because another process bound one of its ports first.
fn port_taken(error: &StartGarageError) -> bool {
    matches!(
        error,
        StartGarageError::NotReady { source: NotReady::Exited { .. }, log, .. }
            if log.contains("ddress already in use")
    )
}

/// 32 random bytes as 64 hex digits (Garage's `rpc_secret` format).
fn random_secret() -> Result<String, StartGarageError> {
    let mut bytes = [0_u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut urandom| urandom.read_exact(&mut bytes))
        .map_err(|source| StartGarageError::Random { source })?;
    Ok(hex::encode(bytes))
}

/// Writes `contents` to a new file only its owner can read (Garage checks the mode).
fn write_private_file(path: &Path, contents: &str) -> Result<(), SetUpDirError> {
    let write = || -> std::io::Result<()> {
        use std::io::Write as _;
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)?;
        file.write_all(contents.as_bytes())
    };
    write().map_err(|source| SetUpDirError::Write {
        path: path.to_owned(),
        source,
    })
}

/// Quotes a string as a TOML basic string (JSON string syntax is valid TOML for these values).
fn toml_str(value: &str) -> String {
    serde_json::Value::String(value.to_owned()).to_string()
}

/// Renders Garage's config file for a node whose files live under `dir`.
#[must_use]
pub fn render_config(
    dir: &Path,
    s3_addr: SocketAddr,
    rpc_addr: SocketAddr,
    rpc_secret: &str,
) -> String {
    format!(
        "metadata_dir = {meta}\n\
         data_dir = {data}\n\
         db_engine = \"sqlite\"\n\
         replication_factor = 1\n\
         rpc_bind_addr = {rpc}\n\
         rpc_public_addr = {rpc}\n\
         rpc_secret = {secret}\n\
         \n\
         [s3_api]\n\
         s3_region = {region}\n\
         api_bind_addr = {s3}\n",
        meta = toml_str(&dir.join("meta").to_string_lossy()),
        data = toml_str(&dir.join("data").to_string_lossy()),
        rpc = toml_str(&rpc_addr.to_string()),
        secret = toml_str(rpc_secret),
        region = toml_str(REGION),
        s3 = toml_str(&s3_addr.to_string()),
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    #[test]
    fn the_config_binds_loopback_and_uses_sqlite() {
        let config = render_config(
            Path::new("/tmp/g"),
            "127.0.0.1:3900".parse().unwrap(),
            "127.0.0.1:3901".parse().unwrap(),
            "ab",
        );
        assert!(
            config.contains("api_bind_addr = \"127.0.0.1:3900\""),
            "{config}"
        );
        assert!(
            config.contains("rpc_public_addr = \"127.0.0.1:3901\""),
            "{config}"
        );
        assert!(config.contains("db_engine = \"sqlite\""), "{config}");
        assert!(config.contains("data_dir = \"/tmp/g/data\""), "{config}");
    }

    #[test]
    fn secrets_are_random_hex() {
        let (a, b) = (random_secret().unwrap(), random_secret().unwrap());
        assert_eq!(a.len(), 64);
        assert_ne!(a, b);
    }

    #[tokio::test]
    async fn a_missing_binary_points_at_the_build_script() {
        let err = Garage::start_with_binary(PathBuf::from("/nonexistent/garage"))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("scripts/s3-server"), "{err}");
    }
}
