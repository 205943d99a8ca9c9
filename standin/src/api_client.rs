//! The API client of the stand-in commands, from a kubeconfig file.
//!
//! Invariant: the rustls crypto provider (ring) is installed before the first TLS use, once per
//! process.

use std::path::{Path, PathBuf};

use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};

/// Why the client could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ConnectApiError {
    /// The kubeconfig could not be read or parsed.
    #[error("read kubeconfig {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: kube::config::KubeconfigError,
    },
    /// The kubeconfig does not make a usable configuration.
    #[error("use kubeconfig {path}: {source}")]
    Config {
        /// The file.
        path: PathBuf,
        /// Why.
        source: kube::config::KubeconfigError,
    },
    /// The client could not be built.
    #[error("build API client: {0}")]
    Client(#[from] kube::Error),
}

/// Installs the process-wide rustls provider (ring); later calls are no-ops.
pub fn install_crypto() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// A client for the cluster of the kubeconfig at `path` (its current context).
pub async fn from_kubeconfig(path: &Path) -> Result<Client, ConnectApiError> {
    install_crypto();
    let kubeconfig = Kubeconfig::read_from(path).map_err(|source| ConnectApiError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .map_err(|source| ConnectApiError::Config {
            path: path.to_path_buf(),
            source,
        })?;
    Ok(Client::try_from(config)?)
}
