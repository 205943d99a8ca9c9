//! Kubeconfig files for the test cluster, rendered as text (pure): one cluster, one user, one
//! context, the CA embedded, and either an embedded client certificate or a bearer token.
//!
//! Invariant: the files are what `kubectl config` would write, so kubectl, helm and kube-rs all
//! read them; nothing in them points outside the cluster's own addresses.

use base64::Engine as _;

/// How the kubeconfig's user authenticates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Credentials {
    /// An X.509 client certificate and key (PEM).
    ClientCertificate {
        /// Certificate PEM.
        cert_pem: String,
        /// Key PEM.
        key_pem: String,
    },
    /// A bearer token (for example a ServiceAccount token from the TokenRequest API).
    Token(String),
}

/// Renders a kubeconfig for `server` (an `https://` URL) trusting `ca_pem`, with `namespace` as
/// the context's default namespace when given.
#[must_use]
pub fn render_kubeconfig(
    server: &str,
    ca_pem: &str,
    user: &str,
    credentials: &Credentials,
    namespace: Option<&str>,
) -> String {
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s.as_bytes());
    let user_fields = match credentials {
        Credentials::ClientCertificate { cert_pem, key_pem } => format!(
            "    client-certificate-data: {}\n    client-key-data: {}\n",
            b64(cert_pem),
            b64(key_pem)
        ),
        Credentials::Token(token) => format!("    token: {token}\n"),
    };
    let namespace_field = namespace
        .map(|ns| format!("    namespace: {ns}\n"))
        .unwrap_or_default();
    format!(
        "apiVersion: v1\n\
         kind: Config\n\
         clusters:\n\
         - name: cachalot-test\n  cluster:\n    server: {server}\n    certificate-authority-data: {ca}\n\
         users:\n\
         - name: {user}\n  user:\n{user_fields}\
         contexts:\n\
         - name: cachalot-test\n  context:\n    cluster: cachalot-test\n    user: {user}\n{namespace_field}\
         current-context: cachalot-test\n",
        ca = b64(ca_pem),
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    #[test]
    fn a_token_kubeconfig_names_the_server_the_user_and_the_namespace() {
        let text = render_kubeconfig(
            "https://127.0.0.1:6443",
            "CA",
            "operator",
            &Credentials::Token("abc".into()),
            Some("cachalot-system"),
        );
        let doc: serde_json::Value = serde_yaml_like(&text);
        assert_eq!(
            doc["clusters"][0]["cluster"]["server"],
            "https://127.0.0.1:6443"
        );
        assert_eq!(doc["users"][0]["user"]["token"], "abc");
        assert_eq!(
            doc["contexts"][0]["context"]["namespace"],
            "cachalot-system"
        );
        assert_eq!(doc["current-context"], "cachalot-test");
    }

    #[test]
    fn a_certificate_kubeconfig_embeds_base64_pem() {
        let text = render_kubeconfig(
            "https://10.240.0.2:6443",
            "CA",
            "admin",
            &Credentials::ClientCertificate {
                cert_pem: "CERT".into(),
                key_pem: "KEY".into(),
            },
            None,
        );
        let doc = serde_yaml_like(&text);
        assert_eq!(
            doc["users"][0]["user"]["client-certificate-data"],
            "Q0VSVA=="
        );
        assert_eq!(doc["users"][0]["user"]["client-key-data"], "S0VZ");
        assert!(doc["contexts"][0]["context"].get("namespace").is_none());
    }

    /// Parses the YAML through kube's own kubeconfig type and back to JSON, so the test fails if
    /// kube-rs could not read the file.
    fn serde_yaml_like(text: &str) -> serde_json::Value {
        let parsed = kube::config::Kubeconfig::from_yaml(text).unwrap();
        assert_eq!(parsed.clusters.len(), 1);
        serde_json::to_value(serde_yaml::from_str::<serde_json::Value>(text).unwrap()).unwrap()
    }
}
