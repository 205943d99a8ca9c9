//! Starts the kube-like fake API server (`tools/fake-apiserver/fake_apiserver.py`, Python on kmock
//! 0.8) as a child process on 127.0.0.1 and hands out `kube::Client`s for it.
//!
//! Invariants: the server only ever binds a loopback address on a free port it picks itself; start-up
//! is bounded by a deadline (the port file appears, or the child's exit is reported with its stderr);
//! the child is killed and reaped when the handle drops, so a failing test leaves no process behind.
//!
//! This file depends only on `kube`, `tokio`, `thiserror` and `tempfile`, so a test crate that
//! cannot depend on `cachalot-e2e` can include it with `#[path]`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use kube::config::{KubeConfigOptions, Kubeconfig};

/// How long the Python process may take to bind its port (imports of aiohttp dominate).
const START_DEADLINE: Duration = Duration::from_secs(30);
/// Gap between two checks of the port file during start-up.
const START_POLL: Duration = Duration::from_millis(25);

/// Why the fake API server could not be started or reached.
#[derive(Debug, thiserror::Error)]
pub enum StartFakeApiServerError {
    #[error("cannot create a temporary directory for the fake API server: {source}")]
    CreateTempDir { source: std::io::Error },
    #[error("fake API server script not found at {path} (run from the cachalot checkout)")]
    ScriptMissing { path: PathBuf },
    #[error(
        "cannot run `{python}` for the fake API server: {source} \
         (install Python 3.11+ and `pip install -r tools/fake-apiserver/requirements.txt`)"
    )]
    Spawn {
        python: String,
        source: std::io::Error,
    },
    #[error(
        "the fake API server exited during start-up ({status}); stderr:\n{stderr}\n\
         (is kmock installed? `pip install -r tools/fake-apiserver/requirements.txt`)"
    )]
    ExitedEarly { status: String, stderr: String },
    #[error("the fake API server did not report its port within {deadline:?}; stderr:\n{stderr}")]
    StartTimeout { deadline: Duration, stderr: String },
    #[error("the fake API server wrote an unreadable port file {path}: {content:?}")]
    BadPortFile { path: PathBuf, content: String },
    #[error("cannot write the kubeconfig for the fake API server to {path}: {source}")]
    WriteKubeconfig {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot build a kube config for {url}: {source}")]
    KubeConfig {
        url: String,
        source: kube::config::KubeconfigError,
    },
    #[error("cannot build a kube client for {url}: {source}")]
    KubeClient { url: String, source: kube::Error },
}

/// A running fake API server; killed when dropped.
pub struct FakeApiServer {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
}

impl std::fmt::Debug for FakeApiServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeApiServer")
            .field("pid", &self.child.id())
            .field("port", &self.port)
            .finish()
    }
}

/// The launcher script, found relative to this crate's manifest (`e2e/` or `operator/`).
pub fn script_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("tools")
        .join("fake-apiserver")
        .join("fake_apiserver.py")
}

/// The Python interpreter: `CACHALOT_PYTHON` if set, else `python3` from `PATH`.
pub fn python() -> String {
    std::env::var("CACHALOT_PYTHON").unwrap_or_else(|_| "python3".to_owned())
}

/// A kubeconfig (YAML) with one cluster, context and anonymous user pointing at `url`.
pub fn kubeconfig_yaml(url: &str, namespace: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Config\ncurrent-context: fake\n\
         clusters:\n- name: fake\n  cluster:\n    server: {url}\n\
         contexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\n    namespace: {namespace}\n\
         users:\n- name: fake\n  user: {{}}\n"
    )
}

impl FakeApiServer {
    /// Start the server and wait (bounded) until it listens.
    pub async fn start() -> Result<Self, StartFakeApiServerError> {
        Self::start_with_args(&[]).await
    }

    /// Like [`FakeApiServer::start`], with extra command-line flags for the server (for example
    /// `["--history", "2"]` to make watch resumes expire quickly).
    pub async fn start_with_args(extra: &[&str]) -> Result<Self, StartFakeApiServerError> {
        let script = script_path();
        if !script.is_file() {
            return Err(StartFakeApiServerError::ScriptMissing { path: script });
        }
        let dir = tempfile::Builder::new()
            .prefix("cachalot-fake-apiserver-")
            .tempdir()
            .map_err(|source| StartFakeApiServerError::CreateTempDir { source })?;
        let port_file = dir.path().join("port");
        let stderr_path = dir.path().join("stderr.log");
        let stderr = std::fs::File::create(&stderr_path)
            .map_err(|source| StartFakeApiServerError::CreateTempDir { source })?;
        let python = python();
        let child = Command::new(&python)
            .arg(&script)
            .arg("--host")
            .arg("127.0.0.1")
            .arg("--port")
            .arg("0")
            .arg("--port-file")
            .arg(&port_file)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(stderr))
            .spawn()
            .map_err(|source| StartFakeApiServerError::Spawn {
                python: python.clone(),
                source,
            })?;
        // From here on the child is owned by a value whose Drop kills it, even on early return.
        let mut server = Self {
            child,
            port: 0,
            dir,
        };
        server.port = server.wait_for_port(&port_file, &stderr_path).await?;
        Ok(server)
    }

    async fn wait_for_port(
        &mut self,
        port_file: &Path,
        stderr_path: &Path,
    ) -> Result<u16, StartFakeApiServerError> {
        let read_stderr = || std::fs::read_to_string(stderr_path).unwrap_or_default();
        let deadline = tokio::time::Instant::now() + START_DEADLINE;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(StartFakeApiServerError::ExitedEarly {
                    status: status.to_string(),
                    stderr: read_stderr(),
                });
            }
            // The server writes the file atomically (temp file + rename) once it listens.
            if let Ok(content) = std::fs::read_to_string(port_file) {
                return content.trim().parse::<u16>().map_err(|_| {
                    StartFakeApiServerError::BadPortFile {
                        path: port_file.to_path_buf(),
                        content,
                    }
                });
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(StartFakeApiServerError::StartTimeout {
                    deadline: START_DEADLINE,
                    stderr: read_stderr(),
                });
            }
            tokio::time::sleep(START_POLL).await;
        }
    }

    /// The TCP port the server listens on (on 127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server's base URL, `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The child's process id (for memory or liveness checks by tests).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What the server wrote to stderr so far (for test failure messages).
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stderr.log")).unwrap_or_default()
    }

    /// Write a kubeconfig for this server (default namespace `namespace`) and return its path,
    /// for processes such as the operator binary that read `KUBECONFIG`.
    pub fn write_kubeconfig(&self, namespace: &str) -> Result<PathBuf, StartFakeApiServerError> {
        let path = self.dir.path().join("kubeconfig");
        std::fs::write(&path, kubeconfig_yaml(&self.url(), namespace)).map_err(|source| {
            StartFakeApiServerError::WriteKubeconfig {
                path: path.clone(),
                source,
            }
        })?;
        Ok(path)
    }

    /// A `kube::Client` built from a kubeconfig pointing at this server, default namespace
    /// `namespace`.
    pub async fn client(&self, namespace: &str) -> Result<kube::Client, StartFakeApiServerError> {
        let url = self.url();
        let kubeconfig =
            Kubeconfig::from_yaml(&kubeconfig_yaml(&url, namespace)).map_err(|source| {
                StartFakeApiServerError::KubeConfig {
                    url: url.clone(),
                    source,
                }
            })?;
        let config =
            kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
                .await
                .map_err(|source| StartFakeApiServerError::KubeConfig {
                    url: url.clone(),
                    source,
                })?;
        kube::Client::try_from(config)
            .map_err(|source| StartFakeApiServerError::KubeClient { url, source })
    }
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        // Best effort: the process may already be gone; reaping avoids a zombie per test.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
