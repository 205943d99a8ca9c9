//! The plain-HTTP client every harness component and test uses.
//!
//! The workspace builds reqwest with `rustls-no-provider`, so a crypto provider must be installed
//! before any client is built, even one that only speaks plain HTTP to 127.0.0.1. Redirects are
//! not followed and no proxy is consulted, so a test sees exactly what a server answered.

use std::time::Duration;

/// Why the HTTP client could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BuildClientError {
    /// reqwest rejected the configuration.
    #[error("build HTTP client")]
    Build {
        /// The reqwest error.
        source: reqwest::Error,
    },
}

/// Installs the process-wide rustls crypto provider (ring) if none is installed yet.
pub fn install_crypto_provider() {
    // Fails only when a provider is already installed, which is what we want anyway.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Builds a reqwest client for talking to loopback servers: no redirects, no proxy, no
/// decompression, a 10 s connect timeout and no overall timeout (big blobs take a while).
///
/// # Errors
/// [`BuildClientError::Build`] if reqwest cannot build the client.
pub fn http_client() -> Result<reqwest::Client, BuildClientError> {
    install_crypto_provider();
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .connect_timeout(Duration::from_secs(10))
        .pool_idle_timeout(Duration::from_secs(30))
        .build()
        .map_err(|source| BuildClientError::Build { source })
}
