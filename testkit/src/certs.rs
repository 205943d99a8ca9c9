//! Certificates made in the test (rcgen) for registries serving TLS: a CA, server certificates it
//! signs for given addresses and names, and client certificates for mTLS, all as PEM.

use std::net::IpAddr;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType,
};

/// Why a test certificate could not be made.
#[derive(Debug, thiserror::Error)]
#[error("make a test certificate: {0}")]
pub struct MakeCertificateError(#[from] rcgen::Error);

/// A certificate and its private key, as PEM.
#[derive(Debug, Clone)]
pub struct CertifiedKey {
    /// The certificate (what `tls.crt` holds).
    pub cert_pem: String,
    /// Its private key (what `tls.key` holds).
    pub key_pem: String,
}

/// A test CA that signs server and client certificates.
pub struct TestCa {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl TestCa {
    /// A self-signed CA named `name`.
    ///
    /// # Errors
    /// [`MakeCertificateError`] when a key or the certificate cannot be generated.
    pub fn new(name: &str) -> Result<Self, MakeCertificateError> {
        let mut params = CertificateParams::default();
        params.distinguished_name = common_name(name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        Ok(Self {
            issuer: CertifiedIssuer::self_signed(params, KeyPair::generate()?)?,
        })
    }

    /// The CA certificate (what a Secret's `ca.crt` or a `caFile` holds).
    pub fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// A server certificate named `name` for the addresses `ips` and host names `dns`.
    ///
    /// # Errors
    /// [`MakeCertificateError`] when a key, a name or the certificate is refused.
    pub fn server(
        &self,
        name: &str,
        ips: &[IpAddr],
        dns: &[&str],
    ) -> Result<CertifiedKey, MakeCertificateError> {
        let mut params = CertificateParams::default();
        params.distinguished_name = common_name(name);
        params.subject_alt_names = ips.iter().map(|ip| SanType::IpAddress(*ip)).collect();
        for name in dns {
            params
                .subject_alt_names
                .push(SanType::DnsName((*name).try_into()?));
        }
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.sign(params)
    }

    /// A client certificate named `name` (for mTLS).
    ///
    /// # Errors
    /// [`MakeCertificateError`] when a key or the certificate cannot be generated.
    pub fn client(&self, name: &str) -> Result<CertifiedKey, MakeCertificateError> {
        let mut params = CertificateParams::default();
        params.distinguished_name = common_name(name);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.sign(params)
    }

    fn sign(&self, params: CertificateParams) -> Result<CertifiedKey, MakeCertificateError> {
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(CertifiedKey {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

fn common_name(name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    dn
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    #[test]
    fn a_server_certificate_names_its_addresses_and_is_signed_by_the_ca() {
        let ca = TestCa::new("test CA").unwrap();
        let server = ca
            .server("cachalot", &["127.0.0.1".parse().unwrap()], &["localhost"])
            .unwrap();
        assert!(ca.pem().starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(server.cert_pem.starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(server.key_pem.contains("PRIVATE KEY"));
        assert_ne!(server.cert_pem, ca.pem());
        assert!(
            ca.server("x", &[], &["hôte"]).is_err(),
            "a DNS name is ASCII"
        );
    }
}
