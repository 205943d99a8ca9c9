//! The API server's audit log, read back: one event per request, with who made it, the verb and
//! the object. Tests count an operator's API calls from it (for example "no writes when nothing
//! changed"), which no client-side counter can prove.
//!
//! Invariant: parsing is pure and tolerant: a line that is not an audit event (a torn last line
//! while the API server writes) is skipped, never an error.

use serde::Deserialize;

/// The audit policy the fixture gives the API server: metadata of every request, logged once it
/// is answered.
pub const POLICY: &str = "apiVersion: audit.k8s.io/v1\n\
kind: Policy\n\
omitStages: [\"RequestReceived\", \"ResponseStarted\"]\n\
rules:\n\
- level: Metadata\n";

/// One audited request.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AuditEvent {
    /// `get`, `list`, `watch`, `create`, `update`, `patch`, `delete`, ...
    pub verb: String,
    /// The request path and query.
    #[serde(rename = "requestURI")]
    pub request_uri: String,
    /// Who made it.
    pub user: AuditUser,
    /// What it was about (absent for non-resource URLs such as `/readyz`).
    #[serde(default)]
    pub object_ref: Option<ObjectRef>,
    /// The answer's status code.
    #[serde(default)]
    pub response_status: Option<ResponseStatus>,
    /// `ResponseComplete` or `Panic`.
    pub stage: String,
    /// Client addresses. Requests from pods come through the proxy stand-in, so they show its
    /// address, not the pod's: tell clients apart by [`AuditEvent::user_agent`].
    #[serde(default, rename = "sourceIPs")]
    pub source_ips: Vec<String>,
    /// The client's `User-Agent`.
    #[serde(default)]
    pub user_agent: String,
    /// When the answer was complete, RFC 3339 with microseconds (`2026-12-06T08:11:26.519354Z`);
    /// fixed width, so strings compare in time order.
    #[serde(default)]
    pub stage_timestamp: String,
}

/// The authenticated user of a request.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct AuditUser {
    /// For example `system:serviceaccount:cachalot-system:cachalot`.
    #[serde(default)]
    pub username: String,
}

/// The object a request was about.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "camelCase", default)]
pub struct ObjectRef {
    /// Plural resource, e.g. `registrymirrors`.
    pub resource: String,
    /// Namespace, if namespaced.
    pub namespace: Option<String>,
    /// Name, when the request named one.
    pub name: Option<String>,
    /// `status`, `finalize`, ...
    pub subresource: Option<String>,
    /// API group (`""` for core).
    pub api_group: Option<String>,
}

/// The status code of the answer.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct ResponseStatus {
    /// HTTP status code.
    #[serde(default)]
    pub code: u16,
}

impl AuditEvent {
    /// Whether the request asked to change something (create, update, patch, delete).
    #[must_use]
    pub fn is_write(&self) -> bool {
        matches!(
            self.verb.as_str(),
            "create" | "update" | "patch" | "delete" | "deletecollection"
        )
    }
}

/// Parses an audit log (JSON lines), skipping lines that are not events.
#[must_use]
pub fn parse_audit_log(text: &str) -> Vec<AuditEvent> {
    text.lines()
        .filter_map(|line| serde_json::from_str(line).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    #[test]
    fn events_are_parsed_and_torn_lines_skipped() {
        let log = concat!(
            r#"{"kind":"Event","apiVersion":"audit.k8s.io/v1","level":"Metadata","auditID":"a","stage":"ResponseComplete","requestURI":"/apis/cachalot.dev/v1alpha1/namespaces/t/registrymirrors/m/status","verb":"patch","user":{"username":"system:serviceaccount:cachalot-system:cachalot","groups":["system:serviceaccounts"]},"objectRef":{"resource":"registrymirrors","namespace":"t","name":"m","apiGroup":"cachalot.dev","apiVersion":"v1alpha1","subresource":"status"},"responseStatus":{"metadata":{},"code":200}}"#,
            "\n",
            r#"{"kind":"Event","apiVersion":"audit.k8s.io/v1","level":"Metadata","stage":"ResponseComplete","requestURI":"/readyz","verb":"get","user":{"username":"admin"}}"#,
            "\n",
            r#"{"kind":"Event","apiVe"#,
        );
        let events = parse_audit_log(log);
        assert_eq!(events.len(), 2);
        assert!(events[0].is_write());
        let object = events[0].object_ref.as_ref().unwrap();
        assert_eq!(object.subresource.as_deref(), Some("status"));
        assert_eq!(events[0].response_status.as_ref().unwrap().code, 200);
        assert!(!events[1].is_write());
        assert!(events[1].object_ref.is_none());
        assert!(events[1].source_ips.is_empty());
    }
}
