//! The token service client: which realms may see credentials, one bounded token request, and
//! what its answer means.
//!
//! Invariants: credentials are sent only to a realm on the registry's own host or on a host the
//! registry allows (`tokenHosts`, plus the built-in ones of well-known registries), and never
//! over plain http when the registry itself is https. A token answer is read up to
//! [`MAX_TOKEN_BODY`] bytes within the response timeout, so a token service that streams forever
//! or hangs costs a bounded amount of memory and time. Every failure is a [`FetchTokenError`]
//! that says which of these went wrong; none of them panics.

use std::time::Duration;

use http::{header, StatusCode};

use super::auth::{BasicCredentials, TokenResponse};

/// Token answers larger than this are refused (a JWT for one scope is a few KiB).
pub const MAX_TOKEN_BODY: usize = 64 * 1024;

/// Why no token could be had from the token service.
#[derive(Debug, Clone, thiserror::Error)]
pub enum FetchTokenError {
    #[error("the token endpoint answered {}", status.as_u16())]
    Status {
        status: StatusCode,
        retry_after: Option<String>,
    },
    #[error("the token endpoint did not answer within {}s", timeout.as_secs_f32())]
    Timeout { timeout: Duration },
    #[error("cannot reach the token endpoint: {message}")]
    Connect { message: String },
    #[error("{message}")]
    Invalid { message: String },
    #[error("{message}")]
    RealmRefused { message: String },
}

impl FetchTokenError {
    /// Whether the token service said no to these credentials (as opposed to failing).
    pub fn is_denial(&self) -> bool {
        matches!(
            self,
            FetchTokenError::Status { status, .. }
                if *status == StatusCode::UNAUTHORIZED || *status == StatusCode::FORBIDDEN
        )
    }

    /// Whether the token service looks down or overloaded (what a circuit breaker counts).
    pub fn is_outage(&self) -> bool {
        match self {
            FetchTokenError::Status { status, .. } => status.is_server_error(),
            FetchTokenError::Timeout { .. } | FetchTokenError::Connect { .. } => true,
            FetchTokenError::Invalid { .. } | FetchTokenError::RealmRefused { .. } => false,
        }
    }

    /// Whether the token service answered 429: the upstream is rate-limiting us.
    pub fn is_rate_limit(&self) -> bool {
        matches!(self, FetchTokenError::Status { status, .. } if *status == StatusCode::TOO_MANY_REQUESTS)
    }

    /// The `Retry-After` seconds of a 429, if any.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            FetchTokenError::Status {
                status,
                retry_after: Some(v),
            } if *status == StatusCode::TOO_MANY_REQUESTS => {
                v.trim().parse::<u64>().ok().map(Duration::from_secs)
            }
            _ => None,
        }
    }
}

/// Token hosts every registry of this name may use, without configuration: Docker Hub's token
/// service is `auth.docker.io`, GitLab's registry sends clients to `gitlab.com`.
pub fn builtin_token_hosts(registry: &str) -> &'static [&'static str] {
    match registry {
        crate::config::DOCKER_HUB => &["auth.docker.io"],
        "registry.gitlab.com" => &["gitlab.com"],
        _ => &[],
    }
}

/// Decides whether a token may be requested from `realm`. Anonymous requests may go to any
/// http(s) realm; with credentials the realm's host must be the registry's own (`registry` is
/// the URL requests are sent to) or one of `token_hosts` (lower case), and must not downgrade
/// an https registry to plain http. Pure.
pub fn check_realm(
    registry_name: &str,
    realm: &reqwest::Url,
    registry: &reqwest::Url,
    token_hosts: &[String],
    with_credentials: bool,
) -> Result<(), FetchTokenError> {
    let refused = |message: String| FetchTokenError::RealmRefused { message };
    if !matches!(realm.scheme(), "http" | "https") {
        return Err(refused(format!(
            "the token realm {realm} is not an http(s) URL"
        )));
    }
    if !with_credentials {
        return Ok(());
    }
    let realm_host = realm.host_str().unwrap_or("").to_ascii_lowercase();
    let own_host = registry.host_str().unwrap_or("").to_ascii_lowercase();
    let allowed = realm_host == own_host || token_hosts.contains(&realm_host);
    if !allowed {
        return Err(refused(format!(
            "the token realm is on {realm_host}, not on the registry's host {own_host}; \
             credentials are not sent there unless registries.{registry_name}.tokenHosts lists it"
        )));
    }
    if registry.scheme() == "https" && realm.scheme() == "http" {
        return Err(refused(format!(
            "the token realm {realm} is plain http while the registry is https; credentials \
             are not sent in clear text"
        )));
    }
    Ok(())
}

/// Everything one token request needs, owned, so it can run in its own task.
#[derive(Debug, Clone)]
pub struct TokenRequest {
    pub client: reqwest::Client,
    /// The realm with `scope` and `service` in its query.
    pub url: reqwest::Url,
    pub credentials: Option<BasicCredentials>,
    /// Deadline for the headers, and again for the body.
    pub timeout: Duration,
}

/// The status label a token request is counted under: the HTTP status, `timeout` or `error`;
/// `None` for a request that was never sent.
pub fn status_label(result: &Result<(String, Duration), FetchTokenError>) -> Option<String> {
    match result {
        // An answer that came but could not be used was a 2xx.
        Ok(_) | Err(FetchTokenError::Invalid { .. }) => Some("200".to_owned()),
        Err(FetchTokenError::Status { status, .. }) => Some(status.as_str().to_owned()),
        Err(FetchTokenError::Timeout { .. }) => Some("timeout".to_owned()),
        Err(FetchTokenError::Connect { .. }) => Some("error".to_owned()),
        Err(FetchTokenError::RealmRefused { .. }) => None,
    }
}

/// Sends one token request and reads its answer, bounded in size and time.
pub async fn request_token(request: TokenRequest) -> Result<(String, Duration), FetchTokenError> {
    let mut builder = request.client.get(request.url);
    if let Some(c) = &request.credentials {
        builder = builder.basic_auth(&c.username, Some(&c.password));
    }
    let mut response = match tokio::time::timeout(request.timeout, builder.send()).await {
        Err(_) => {
            return Err(FetchTokenError::Timeout {
                timeout: request.timeout,
            })
        }
        Ok(Err(e)) if e.is_timeout() => {
            return Err(FetchTokenError::Timeout {
                timeout: request.timeout,
            })
        }
        Ok(Err(e)) => {
            return Err(FetchTokenError::Connect {
                message: super::error_chain(&e),
            })
        }
        Ok(Ok(response)) => response,
    };
    let status = response.status();
    if !status.is_success() {
        return Err(FetchTokenError::Status {
            status,
            retry_after: response
                .headers()
                .get(header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned),
        });
    }
    let content_type = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let too_large = || FetchTokenError::Invalid {
        message: format!(
            "the token response is larger than {} KiB",
            MAX_TOKEN_BODY / 1024
        ),
    };
    if response
        .content_length()
        .is_some_and(|len| len > MAX_TOKEN_BODY as u64)
    {
        return Err(too_large());
    }
    let read = async {
        let mut body = Vec::new();
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|e| FetchTokenError::Connect {
                message: format!("the token response broke off: {}", super::error_chain(&e)),
            })?
        {
            if body.len() + chunk.len() > MAX_TOKEN_BODY {
                return Err(too_large());
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body)
    };
    let body = tokio::time::timeout(request.timeout, read)
        .await
        .map_err(|_| FetchTokenError::Timeout {
            timeout: request.timeout,
        })??;
    parse_token(&content_type, &body)
}

/// Interprets a 2xx token answer. Pure.
pub fn parse_token(content_type: &str, body: &[u8]) -> Result<(String, Duration), FetchTokenError> {
    let invalid = |message: String| FetchTokenError::Invalid { message };
    let parsed: TokenResponse = match serde_json::from_slice(body) {
        Ok(parsed) => parsed,
        Err(e) => {
            let looks_html = content_type.to_ascii_lowercase().contains("html")
                || body.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'<');
            return Err(if looks_html {
                invalid(format!(
                    "the token endpoint answered an HTML page (content-type `{content_type}`), \
                     not a JSON token: a login page or a proxy in the way?"
                ))
            } else {
                invalid(format!("the token response is not JSON: {e}"))
            });
        }
    };
    parsed
        .into_token()
        .ok_or_else(|| invalid("the token response has neither `token` nor `access_token`".into()))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]
    use super::*;

    fn url(s: &str) -> reqwest::Url {
        reqwest::Url::parse(s).unwrap()
    }

    #[test]
    fn credentials_go_only_to_the_registrys_own_host_or_an_allowed_one() {
        let registry = url("https://registry.example:5000");
        let own = url("https://registry.example/token");
        let other = url("https://auth.example/token");
        assert!(check_realm("r", &own, &registry, &[], true).is_ok());
        let refused = check_realm("r", &other, &registry, &[], true).unwrap_err();
        assert!(matches!(refused, FetchTokenError::RealmRefused { .. }));
        assert!(
            refused.to_string().contains("auth.example")
                && refused.to_string().contains("registries.r.tokenHosts"),
            "{refused}"
        );
        assert!(check_realm("r", &other, &registry, &["auth.example".into()], true).is_ok());
        // Anonymous token requests may go anywhere http(s).
        assert!(check_realm("r", &other, &registry, &[], false).is_ok());
        assert!(check_realm("r", &url("ftp://x/token"), &registry, &[], false).is_err());
        // No downgrade to clear text with credentials, even on the same host.
        let clear = url("http://registry.example/token");
        assert!(check_realm("r", &clear, &registry, &[], true).is_err());
        assert!(check_realm("r", &clear, &registry, &[], false).is_ok());
    }

    #[test]
    fn docker_hub_has_its_token_service_built_in() {
        assert_eq!(builtin_token_hosts("docker.io"), ["auth.docker.io"]);
        assert_eq!(builtin_token_hosts("registry.gitlab.com"), ["gitlab.com"]);
        assert!(builtin_token_hosts("quay.io").is_empty());
    }

    #[test]
    fn token_answers_without_a_token_or_in_html_say_so() {
        let (token, ttl) =
            parse_token("application/json", br#"{"token":"t","expires_in":300}"#).unwrap();
        assert_eq!((token.as_str(), ttl), ("t", Duration::from_secs(300)));
        let (token, _) = parse_token("", br#"{"access_token":"a"}"#).unwrap();
        assert_eq!(token, "a");
        for (content_type, body, says) in [
            (
                "application/json",
                &br#"{"details":"ok"}"#[..],
                "neither `token`",
            ),
            ("application/json", br#"{"token":""}"#, "neither `token`"),
            (
                "text/html; charset=utf-8",
                b"<html>login</html>",
                "HTML page",
            ),
            ("text/plain", b"  <!doctype html>", "HTML page"),
            ("application/octet-stream", b"\x00\x01garbage", "not JSON"),
        ] {
            let e = parse_token(content_type, body).unwrap_err();
            assert!(e.to_string().contains(says), "{content_type}: {e}");
        }
    }

    #[test]
    fn only_server_errors_and_silence_are_outages_and_only_401_403_are_denials() {
        let status = |code: u16| FetchTokenError::Status {
            status: StatusCode::from_u16(code).unwrap(),
            retry_after: Some("7".into()),
        };
        assert!(status(503).is_outage() && !status(503).is_denial());
        assert!(status(401).is_denial() && status(403).is_denial());
        assert!(!status(429).is_outage());
        assert!(status(429).is_rate_limit() && !status(503).is_rate_limit());
        assert_eq!(status(429).retry_after(), Some(Duration::from_secs(7)));
        assert_eq!(status(503).retry_after(), None);
        assert!(FetchTokenError::Timeout {
            timeout: Duration::from_secs(1)
        }
        .is_outage());
    }
}
