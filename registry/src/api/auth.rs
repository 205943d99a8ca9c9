//! Client authentication of the pull API: a bearer token read from a file (`auth`), checked in
//! constant time on every `/v2/` request; the health endpoints stay open.
//!
//! A missing or wrong token is a 401 with a `WWW-Authenticate: Bearer realm=...` challenge and
//! the OCI `UNAUTHORIZED` envelope. The token file is a [`TokenFile`]: re-read when it changes,
//! keeping the last good token when it turns bad.

use std::sync::Arc;

use axum::extract::Request;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Router;
use http::{header, HeaderValue, StatusCode};
use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq as _;

use crate::oci::{ErrorCode, OciError};
use crate::token_file::TokenFile;

/// Paths that answer without a credential.
const OPEN_PATHS: &[&str] = &["/healthz", "/readyz"];

/// The challenge of a 401 (no token service is behind the realm: clients send the configured
/// token directly).
const CHALLENGE: &str = "Bearer realm=\"cachalot\"";

/// Whether `presented` equals `expected`, in time independent of where they differ (both are
/// hashed first, so the length does not show either).
#[must_use]
pub fn tokens_match(presented: &str, expected: &str) -> bool {
    let a = Sha256::digest(presented.as_bytes());
    let b = Sha256::digest(expected.as_bytes());
    a.ct_eq(&b).into()
}

/// The token of an `Authorization: Bearer <token>` header value. Pure.
#[must_use]
pub fn bearer_token(value: &HeaderValue) -> Option<&str> {
    let value = value.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

fn unauthorized(message: &str) -> Response {
    let mut response =
        OciError::new(StatusCode::UNAUTHORIZED, ErrorCode::Unauthorized, message).into_response();
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static(CHALLENGE),
    );
    response.headers_mut().insert(
        "docker-distribution-api-version",
        HeaderValue::from_static("registry/2.0"),
    );
    response
}

async fn require_token(token: Arc<TokenFile>, request: Request, next: Next) -> Response {
    if OPEN_PATHS.contains(&request.uri().path()) {
        return next.run(request).await;
    }
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(bearer_token);
    match presented {
        Some(presented) if tokens_match(presented, &token.current()) => next.run(request).await,
        Some(_) => unauthorized("the bearer token is not valid for this registry"),
        None => unauthorized("this registry needs a bearer token"),
    }
}

/// `router` with every request but the health endpoints requiring `token`.
pub fn require(router: Router, token: Arc<TokenFile>) -> Router {
    router.layer(axum::middleware::from_fn(move |request, next| {
        require_token(Arc::clone(&token), request, next)
    }))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    #[test]
    fn bearer_token_takes_the_bearer_scheme_only() {
        let v = |s: &str| HeaderValue::from_str(s).unwrap();
        assert_eq!(bearer_token(&v("Bearer abc")), Some("abc"));
        assert_eq!(bearer_token(&v("bearer  abc ")), Some("abc"));
        assert_eq!(bearer_token(&v("Basic YTpi")), None);
        assert_eq!(bearer_token(&v("Bearer ")), None);
        assert_eq!(bearer_token(&v("Bearer")), None);
    }

    #[test]
    fn tokens_match_only_when_equal() {
        assert!(tokens_match("s3cret", "s3cret"));
        assert!(!tokens_match("s3cre", "s3cret"));
        assert!(!tokens_match("s3creT", "s3cret"));
        assert!(!tokens_match("", "s3cret"));
    }
}
