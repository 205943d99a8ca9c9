//! TLS for the listener: the rustls acceptor built from `tls` (certificate, key, optional client
//! CA for mTLS) and the certificate that is re-read when its files change.
//!
//! The certificate lives behind a [`ResolvesServerCert`] that hands out the last good one; a task
//! re-reads both files every [`RELOAD_INTERVAL`] and swaps in a new pair when their contents
//! changed and load (a bad new pair is logged once and the old one kept). A bad pair at start is
//! an error, so the process exits. The client CA is read once at start.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::Duration;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;

use crate::config::TlsConfig;

/// How often the certificate files are re-read.
pub const RELOAD_INTERVAL: Duration = Duration::from_secs(1);

/// Why the TLS certificate, key or client CA could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadTlsError {
    #[error("tls: cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("tls: {path} holds no PEM certificate")]
    NoCertificate { path: PathBuf },
    #[error("tls: {path} holds no PEM private key")]
    NoKey { path: PathBuf },
    #[error("tls: the certificate {cert} and key {key} do not make a usable pair: {source}")]
    Pair {
        cert: PathBuf,
        key: PathBuf,
        source: rustls::Error,
    },
    #[error("tls.clientCaFile: {path}: {message}")]
    ClientCa { path: PathBuf, message: String },
    #[error("tls: {0}")]
    Config(rustls::Error),
}

fn read(path: &Path) -> Result<Vec<u8>, LoadTlsError> {
    std::fs::read(path).map_err(|source| LoadTlsError::Read {
        path: path.to_owned(),
        source,
    })
}

/// Parses a PEM certificate chain and key into a pair whose key matches the first certificate.
/// Pure apart from the file names in its errors.
pub fn parse_certified_key(
    cert_pem: &[u8],
    key_pem: &[u8],
    cert_path: &Path,
    key_path: &Path,
    provider: &CryptoProvider,
) -> Result<CertifiedKey, LoadTlsError> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem)
        .filter_map(Result::ok)
        .collect();
    if chain.is_empty() {
        return Err(LoadTlsError::NoCertificate {
            path: cert_path.to_owned(),
        });
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|_| LoadTlsError::NoKey {
        path: key_path.to_owned(),
    })?;
    CertifiedKey::from_der(chain, key, provider).map_err(|source| LoadTlsError::Pair {
        cert: cert_path.to_owned(),
        key: key_path.to_owned(),
        source,
    })
}

/// The serving certificate: the last good pair read from the files.
#[derive(Debug)]
pub struct ReloadingCert {
    cert_file: PathBuf,
    key_file: PathBuf,
    provider: Arc<CryptoProvider>,
    current: RwLock<Arc<CertifiedKey>>,
    /// The file contents last tried (good or bad), so one bad version is reported once.
    last_seen: Mutex<(Vec<u8>, Vec<u8>)>,
}

/// What one look at the files did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reload {
    Unchanged,
    Replaced,
    /// The files changed but do not load; the previous certificate stays.
    KeptPrevious(String),
}

impl ReloadingCert {
    /// Loads the pair once; an error here stops the start.
    pub fn load(
        cert_file: &Path,
        key_file: &Path,
        provider: Arc<CryptoProvider>,
    ) -> Result<Self, LoadTlsError> {
        let (cert_pem, key_pem) = (read(cert_file)?, read(key_file)?);
        let key = parse_certified_key(&cert_pem, &key_pem, cert_file, key_file, &provider)?;
        Ok(ReloadingCert {
            cert_file: cert_file.to_owned(),
            key_file: key_file.to_owned(),
            provider,
            current: RwLock::new(Arc::new(key)),
            last_seen: Mutex::new((cert_pem, key_pem)),
        })
    }

    /// Re-reads the files; swaps in the new pair when they changed and load.
    pub fn reload(&self) -> Reload {
        let files = read(&self.cert_file).and_then(|c| Ok((c, read(&self.key_file)?)));
        let mut last = self.last_seen.lock().unwrap_or_else(|e| e.into_inner());
        let (cert_pem, key_pem) = match files {
            Ok(files) => files,
            // A Secret being swapped may be missing for a moment: try again next time.
            Err(e) => return Reload::KeptPrevious(e.to_string()),
        };
        if last.0 == cert_pem && last.1 == key_pem {
            return Reload::Unchanged;
        }
        let parsed = parse_certified_key(
            &cert_pem,
            &key_pem,
            &self.cert_file,
            &self.key_file,
            &self.provider,
        );
        *last = (cert_pem, key_pem);
        match parsed {
            Ok(key) => {
                *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(key);
                Reload::Replaced
            }
            Err(e) => Reload::KeptPrevious(e.to_string()),
        }
    }

    fn current(&self) -> Arc<CertifiedKey> {
        Arc::clone(&self.current.read().unwrap_or_else(|e| e.into_inner()))
    }
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

/// Re-reads the certificate every [`RELOAD_INTERVAL`] until it is dropped, logging each change.
fn spawn_reloader(cert: &Arc<ReloadingCert>) {
    let weak: Weak<ReloadingCert> = Arc::downgrade(cert);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(RELOAD_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tick.tick().await;
            let Some(cert) = weak.upgrade() else { return };
            let outcome = tokio::task::spawn_blocking(move || cert.reload()).await;
            match outcome {
                Ok(Reload::Unchanged) => {}
                Ok(Reload::Replaced) => {
                    tracing::info!(
                        "tls: the certificate files changed; serving the new certificate"
                    )
                }
                Ok(Reload::KeptPrevious(error)) => tracing::warn!(
                    %error,
                    "tls: cannot load the changed certificate files; still serving the last good certificate"
                ),
                Err(e) => tracing::warn!(error = %e, "tls: certificate reload task failed"),
            }
        }
    });
}

/// Accepts TLS connections with the configured certificate (and client CA).
#[derive(Clone)]
pub struct Acceptor {
    inner: tokio_rustls::TlsAcceptor,
}

impl std::fmt::Debug for Acceptor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Acceptor")
    }
}

impl Acceptor {
    /// Loads the certificate and client CA and starts the reload task (needs a Tokio runtime).
    pub fn new(config: &TlsConfig) -> Result<Self, LoadTlsError> {
        let mut provider = rustls::crypto::ring::default_provider();
        // AES-128-GCM first, whatever the client prefers: as safe as AES-256 here and cheaper
        // per byte, which is what serving large blobs spends.
        provider.cipher_suites.sort_by_key(|s| {
            !matches!(
                s.suite(),
                rustls::CipherSuite::TLS13_AES_128_GCM_SHA256
                    | rustls::CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
                    | rustls::CipherSuite::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256
            )
        });
        let provider = Arc::new(provider);
        let cert = Arc::new(ReloadingCert::load(
            &config.cert_file,
            &config.key_file,
            Arc::clone(&provider),
        )?);
        let builder = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .map_err(LoadTlsError::Config)?;
        let builder = match &config.client_ca_file {
            Some(path) => {
                let client_ca = |message: String| LoadTlsError::ClientCa {
                    path: path.clone(),
                    message,
                };
                let pem = read(path)?;
                let mut roots = rustls::RootCertStore::empty();
                for der in CertificateDer::pem_slice_iter(&pem) {
                    let der = der.map_err(|e| client_ca(e.to_string()))?;
                    roots.add(der).map_err(|e| client_ca(e.to_string()))?;
                }
                if roots.is_empty() {
                    return Err(client_ca("holds no PEM certificate".to_owned()));
                }
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                        .build()
                        .map_err(|e| client_ca(e.to_string()))?;
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let mut server = builder.with_cert_resolver(Arc::clone(&cert) as _);
        server.alpn_protocols = vec![b"http/1.1".to_vec()];
        server.ignore_client_order = true;
        spawn_reloader(&cert);
        Ok(Acceptor {
            inner: tokio_rustls::TlsAcceptor::from(Arc::new(server)),
        })
    }
}

/// An accepted connection, plain or TLS.
#[derive(Debug)]
pub enum MaybeTls {
    Plain(tokio::net::TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<tokio::net::TcpStream>>),
}

/// The connection as the listener serves it: plain without `tls`, else after the handshake
/// (`None` when that fails or takes longer than `timeout`; logged at debug).
pub async fn accept(
    tls: Option<&Acceptor>,
    stream: tokio::net::TcpStream,
    peer: std::net::SocketAddr,
    timeout: Duration,
) -> Option<MaybeTls> {
    let Some(tls) = tls else {
        return Some(MaybeTls::Plain(stream));
    };
    match tokio::time::timeout(timeout, tls.inner.accept(stream)).await {
        Ok(Ok(stream)) => Some(MaybeTls::Tls(Box::new(stream))),
        Ok(Err(e)) => {
            tracing::debug!(%peer, error = %e, "TLS handshake failed");
            None
        }
        Err(_) => {
            tracing::debug!(%peer, "TLS handshake timed out");
            None
        }
    }
}

impl tokio::io::AsyncRead for MaybeTls {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => std::pin::Pin::new(s).poll_read(cx, buf),
            MaybeTls::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl tokio::io::AsyncWrite for MaybeTls {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => std::pin::Pin::new(s).poll_write(cx, buf),
            MaybeTls::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => std::pin::Pin::new(s).poll_write_vectored(cx, bufs),
            MaybeTls::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            MaybeTls::Plain(s) => s.is_write_vectored(),
            MaybeTls::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => std::pin::Pin::new(s).poll_flush(cx),
            MaybeTls::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => std::pin::Pin::new(s).poll_shutdown(cx),
            MaybeTls::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    fn pair(name: &str) -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec![name.to_owned()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        (cert.pem(), key.serialize_pem())
    }

    fn provider() -> Arc<CryptoProvider> {
        Arc::new(rustls::crypto::ring::default_provider())
    }

    #[test]
    fn a_matching_pair_parses_and_garbage_or_a_foreign_key_does_not() {
        let (cert, key) = pair("a.test");
        let (_, other_key) = pair("b.test");
        let (c, k) = (Path::new("c.pem"), Path::new("k.pem"));
        assert!(parse_certified_key(cert.as_bytes(), key.as_bytes(), c, k, &provider()).is_ok());
        let err = parse_certified_key(b"junk", key.as_bytes(), c, k, &provider()).unwrap_err();
        assert!(matches!(err, LoadTlsError::NoCertificate { .. }), "{err}");
        let err = parse_certified_key(cert.as_bytes(), b"junk", c, k, &provider()).unwrap_err();
        assert!(matches!(err, LoadTlsError::NoKey { .. }), "{err}");
        let err = parse_certified_key(cert.as_bytes(), other_key.as_bytes(), c, k, &provider())
            .unwrap_err();
        assert!(matches!(err, LoadTlsError::Pair { .. }), "{err}");
    }

    #[test]
    fn reload_swaps_a_good_new_pair_and_keeps_the_old_one_for_a_bad_pair() {
        let dir = tempfile::tempdir().unwrap();
        let (c, k) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
        let (cert1, key1) = pair("one.test");
        std::fs::write(&c, &cert1).unwrap();
        std::fs::write(&k, &key1).unwrap();
        let reloading = ReloadingCert::load(&c, &k, provider()).unwrap();
        let first = reloading.current().cert[0].clone();
        assert_eq!(reloading.reload(), Reload::Unchanged);

        let (cert2, key2) = pair("two.test");
        std::fs::write(&c, &cert2).unwrap();
        // Half-way: the new certificate with the old key does not load; the old pair stays.
        assert!(matches!(reloading.reload(), Reload::KeptPrevious(_)));
        assert_eq!(reloading.current().cert[0], first);
        // Reported once per bad version.
        assert_eq!(reloading.reload(), Reload::Unchanged);
        std::fs::write(&k, &key2).unwrap();
        assert_eq!(reloading.reload(), Reload::Replaced);
        assert_ne!(reloading.current().cert[0], first);
    }

    #[test]
    fn a_bad_pair_at_start_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let (c, k) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
        std::fs::write(&c, "not a certificate").unwrap();
        std::fs::write(&k, "not a key").unwrap();
        let err = ReloadingCert::load(&c, &k, provider()).unwrap_err();
        assert!(err.to_string().contains("tls.crt"), "{err}");
        let err = ReloadingCert::load(&dir.path().join("missing"), &k, provider()).unwrap_err();
        assert!(matches!(err, LoadTlsError::Read { .. }), "{err}");
    }
}
