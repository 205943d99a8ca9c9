//! The test cluster's certificates and keys: one CA, the API server's serving certificate, the
//! admin client certificate (`O=system:masters`) and the service-account signing key, written as
//! PEM files into the cluster's directory.
//!
//! Invariants: keys are fresh per cluster (ECDSA P-256, generated with ring), nothing is read from
//! or written to the machine's trust stores, and the serving certificate names every address the
//! API server is reached by: the host-side forward (127.0.0.1), the control-plane netns address
//! and the `kubernetes` Service's ClusterIP with its DNS names.

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType,
};

/// Why the cluster's certificates could not be made.
#[derive(Debug, thiserror::Error)]
pub enum GeneratePkiError {
    /// rcgen refused to generate a key or sign a certificate.
    #[error("generate {what}: {source}")]
    Generate {
        /// The key or certificate.
        what: &'static str,
        /// rcgen's error.
        source: rcgen::Error,
    },
    /// A PEM file could not be written.
    #[error("write {path}: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// The PEM files of one cluster.
#[derive(Debug, Clone)]
pub struct Pki {
    /// CA certificate (also the API server's client CA and the kubeconfigs' trust root).
    pub ca_cert: PathBuf,
    /// API server serving certificate and key.
    pub apiserver_cert: PathBuf,
    /// Its key.
    pub apiserver_key: PathBuf,
    /// Admin client certificate (`CN=admin, O=system:masters`).
    pub admin_cert: PathBuf,
    /// Its key.
    pub admin_key: PathBuf,
    /// Service-account token signing key (private: the API server signs and the controller
    /// manager's token controller signs with it).
    pub service_account_key: PathBuf,
    /// Its public half (what the API server verifies tokens with).
    pub service_account_public_key: PathBuf,
    /// The same PEM contents, for kubeconfigs that embed them.
    pub ca_pem: String,
    /// Admin certificate PEM.
    pub admin_cert_pem: String,
    /// Admin key PEM.
    pub admin_key_pem: String,
}

fn generate(what: &'static str) -> impl Fn(rcgen::Error) -> GeneratePkiError {
    move |source| GeneratePkiError::Generate { what, source }
}

fn name(common_name: &str, organization: Option<&str>) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    if let Some(o) = organization {
        dn.push(DnType::OrganizationName, o);
    }
    dn
}

fn write(dir: &Path, file: &str, pem: &str) -> Result<PathBuf, GeneratePkiError> {
    let path = dir.join(file);
    std::fs::write(&path, pem).map_err(|source| GeneratePkiError::Write {
        path: path.clone(),
        source,
    })?;
    Ok(path)
}

/// Generates the cluster's PKI into `dir`. `api_ips` are the addresses the API server's
/// certificate must name besides 127.0.0.1.
///
/// # Errors
/// [`GeneratePkiError`].
pub fn generate_pki(dir: &Path, api_ips: &[Ipv4Addr]) -> Result<Pki, GeneratePkiError> {
    let ca_key = KeyPair::generate().map_err(generate("CA key"))?;
    let mut ca_params = CertificateParams::default();
    ca_params.distinguished_name = name("cachalot-test-ca", None);
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca = CertifiedIssuer::self_signed(ca_params, ca_key).map_err(generate("CA certificate"))?;

    let mut sans = vec![
        SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)),
        SanType::DnsName("localhost".try_into().map_err(generate("SAN localhost"))?),
    ];
    for dns in [
        "kubernetes",
        "kubernetes.default",
        "kubernetes.default.svc",
        "kubernetes.default.svc.cluster.local",
    ] {
        sans.push(SanType::DnsName(
            dns.try_into().map_err(generate("SAN kubernetes"))?,
        ));
    }
    sans.extend(api_ips.iter().map(|ip| SanType::IpAddress(IpAddr::V4(*ip))));
    let server_key = KeyPair::generate().map_err(generate("API server key"))?;
    let mut server_params = CertificateParams::default();
    server_params.distinguished_name = name("kube-apiserver", None);
    server_params.subject_alt_names = sans;
    server_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let server_cert = server_params
        .signed_by(&server_key, &ca)
        .map_err(generate("API server certificate"))?;

    let admin_key = KeyPair::generate().map_err(generate("admin key"))?;
    let mut admin_params = CertificateParams::default();
    admin_params.distinguished_name = name("admin", Some("system:masters"));
    admin_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let admin_cert = admin_params
        .signed_by(&admin_key, &ca)
        .map_err(generate("admin certificate"))?;

    let sa_key = KeyPair::generate().map_err(generate("service-account key"))?;

    let ca_pem = ca.pem();
    let admin_cert_pem = admin_cert.pem();
    let admin_key_pem = admin_key.serialize_pem();
    Ok(Pki {
        ca_cert: write(dir, "ca.crt", &ca_pem)?,
        apiserver_cert: write(dir, "apiserver.crt", &server_cert.pem())?,
        apiserver_key: write(dir, "apiserver.key", &server_key.serialize_pem())?,
        admin_cert: write(dir, "admin.crt", &admin_cert_pem)?,
        admin_key: write(dir, "admin.key", &admin_key_pem)?,
        service_account_key: write(dir, "sa.key", &sa_key.serialize_pem())?,
        service_account_public_key: write(dir, "sa.pub", &sa_key.public_key_pem())?,
        ca_pem,
        admin_cert_pem,
        admin_key_pem,
    })
}

/// A CA and a serving certificate it signed, as PEM: for test servers that clients inside a test
/// cluster reach by IP (for example the upstream registry at its in-cluster address).
#[derive(Debug, Clone)]
pub struct ServerIdentity {
    /// The CA certificate clients trust.
    pub ca_pem: String,
    /// The serving certificate.
    pub cert_pem: String,
    /// Its key.
    pub key_pem: String,
}

/// Makes a fresh CA and a serving certificate for `ips` (and `localhost`/127.0.0.1).
///
/// # Errors
/// [`GeneratePkiError::Generate`].
pub fn server_identity(
    common_name: &str,
    ips: &[Ipv4Addr],
) -> Result<ServerIdentity, GeneratePkiError> {
    let ca_key = KeyPair::generate().map_err(generate("CA key"))?;
    let mut ca_params = CertificateParams::default();
    ca_params.distinguished_name = name(&format!("{common_name} test CA"), None);
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca = CertifiedIssuer::self_signed(ca_params, ca_key).map_err(generate("CA certificate"))?;
    let key = KeyPair::generate().map_err(generate("server key"))?;
    let mut params = CertificateParams::default();
    params.distinguished_name = name(common_name, None);
    params.subject_alt_names = vec![
        SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)),
        SanType::DnsName("localhost".try_into().map_err(generate("SAN localhost"))?),
    ];
    params
        .subject_alt_names
        .extend(ips.iter().map(|ip| SanType::IpAddress(IpAddr::V4(*ip))));
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let cert = params
        .signed_by(&key, &ca)
        .map_err(generate("server certificate"))?;
    Ok(ServerIdentity {
        ca_pem: ca.pem(),
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}
