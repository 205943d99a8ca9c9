//! The admin endpoints: `/admin/warm` (pre-fetch images, streaming progress as newline-delimited
//! JSON) and `/admin/purge` (drop a tag, or a manifest and the blobs nothing else uses; with
//! `cluster` replicas, on every replica, see `purge_fanout`). The running mirror's figures are
//! the existing `/stats`.
//!
//! Bad requests are refused before anything is fetched, with the OCI error envelope; once a warm
//! has started, each item's failure is reported in the stream and the others go on. A warm
//! whose client disconnects finishes the item in progress (its fetches commit) and starts no
//! other.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use bytes::Bytes;
use http::{header, HeaderValue, Method, StatusCode, Uri};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use super::{purge_fanout, AppState};
use crate::oci::{ErrorCode, ImageRef, OciError};
use crate::proxy::purge::{PurgeError, PurgeReport};
use crate::proxy::warm::Platform;

/// The most references one warm request may name.
pub const MAX_WARM_REFS: usize = 1000;

/// The largest admin request body read.
const MAX_BODY_BYTES: usize = 1024 * 1024;

/// The body of `POST /admin/warm`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WarmRequest {
    /// Image references as users write them (`nginx:stable`, `ghcr.io/org/app@sha256:…`).
    pub refs: Vec<String>,
    /// `os/architecture[/variant]`: only that platform of an index; all platforms when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<String>,
}

/// The body of `POST /admin/purge` (the reference may be the `ref` query parameter instead).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PurgeRequest {
    #[serde(rename = "ref")]
    pub reference: String,
}

/// An item's outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Outcome {
    Ok,
    Failed,
}

/// One line of the warm progress stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "camelCase")]
pub enum WarmEvent {
    /// Item `item` (0-based, in request order) starts.
    Start { item: usize, reference: String },
    /// The item's bytes so far (manifests and blobs, cached or fetched).
    Bytes { item: usize, bytes: u64 },
    /// The item ended.
    #[serde(rename_all = "camelCase")]
    Done {
        item: usize,
        reference: String,
        outcome: Outcome,
        manifests: u64,
        blobs: u64,
        bytes: u64,
        /// Blob bytes that were not cached before this warm.
        fetched_bytes: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<String>,
    },
    /// The last line.
    #[serde(rename_all = "camelCase")]
    Summary {
        items: usize,
        ok: usize,
        failed: usize,
        bytes: u64,
        fetched_bytes: u64,
    },
}

/// The admin routes, merged into the router that serves them.
pub fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/admin/warm", post(warm).fallback(method_not_allowed))
        .route(
            "/admin/purge",
            post(purge).delete(purge).fallback(method_not_allowed),
        )
}

async fn method_not_allowed(method: Method) -> Response {
    OciError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        ErrorCode::Unsupported,
        format!("{method} is not supported here"),
    )
    .into_response()
}

fn bad_request(code: ErrorCode, message: String) -> OciError {
    OciError::new(StatusCode::BAD_REQUEST, code, message)
}

fn parse_ref(text: &str) -> Result<ImageRef, OciError> {
    text.parse::<ImageRef>()
        .map_err(|e| bad_request(ErrorCode::NameInvalid, e.to_string()))
}

/// Checks a warm request whole: every reference and the platform. Pure.
pub fn validate_warm(request: &WarmRequest) -> Result<(Vec<ImageRef>, Option<Platform>), OciError> {
    if request.refs.is_empty() {
        return Err(bad_request(
            ErrorCode::NameInvalid,
            "refs is empty: name at least one image".into(),
        ));
    }
    if request.refs.len() > MAX_WARM_REFS {
        return Err(bad_request(
            ErrorCode::NameInvalid,
            format!("at most {MAX_WARM_REFS} refs per request"),
        ));
    }
    let refs = request
        .refs
        .iter()
        .map(|r| parse_ref(r))
        .collect::<Result<Vec<_>, _>>()?;
    let platform = request
        .platform
        .as_deref()
        .map(|p| {
            p.parse::<Platform>()
                .map_err(|e| bad_request(ErrorCode::NameInvalid, e.to_string()))
        })
        .transpose()?;
    Ok((refs, platform))
}

async fn read_json<T: serde::de::DeserializeOwned>(body: Body) -> Result<T, OciError> {
    let bytes = axum::body::to_bytes(body, MAX_BODY_BYTES)
        .await
        .map_err(|e| bad_request(ErrorCode::Unsupported, format!("request body: {e}")))?;
    serde_json::from_slice(&bytes)
        .map_err(|e| bad_request(ErrorCode::Unsupported, format!("request body: {e}")))
}

fn line(event: &WarmEvent) -> Bytes {
    // A plain enum of strings and numbers always serialises.
    let mut text = serde_json::to_string(event).unwrap_or_default();
    text.push('\n');
    Bytes::from(text)
}

async fn warm(State(state): State<Arc<AppState>>, body: Body) -> Response {
    let request: WarmRequest = match read_json(body).await {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    let (refs, platform) = match validate_warm(&request) {
        Ok(v) => v,
        Err(e) => return e.into_response(),
    };
    let (tx, rx) = mpsc::channel::<WarmEvent>(64);
    let proxy = state.proxy.clone();
    tokio::spawn(async move {
        let (mut ok, mut failed, mut bytes, mut fetched_bytes) = (0, 0, 0, 0);
        for (item, image) in refs.iter().enumerate() {
            if tx.is_closed() {
                tracing::info!(
                    left = refs.len() - item,
                    "warm client went away; the rest is not warmed"
                );
                return;
            }
            let reference = image.to_string();
            let _ = tx
                .send(WarmEvent::Start {
                    item,
                    reference: reference.clone(),
                })
                .await;
            let progress_tx = tx.clone();
            let progress = move |bytes: u64| {
                // Progress lines may be dropped when the client reads slowly; the outcome not.
                let _ = progress_tx.try_send(WarmEvent::Bytes { item, bytes });
            };
            let result = proxy.warm(image, platform.as_ref(), &progress).await;
            let done = match result {
                Ok(w) => {
                    ok += 1;
                    bytes += w.bytes;
                    fetched_bytes += w.fetched_bytes;
                    tracing::info!(
                        reference,
                        bytes = w.bytes,
                        fetched_bytes = w.fetched_bytes,
                        "warmed"
                    );
                    WarmEvent::Done {
                        item,
                        reference,
                        outcome: Outcome::Ok,
                        manifests: w.manifests,
                        blobs: w.blobs,
                        bytes: w.bytes,
                        fetched_bytes: w.fetched_bytes,
                        error: None,
                    }
                }
                Err(e) => {
                    failed += 1;
                    tracing::info!(reference, error = %e, "warm failed");
                    WarmEvent::Done {
                        item,
                        reference,
                        outcome: Outcome::Failed,
                        manifests: 0,
                        blobs: 0,
                        bytes: 0,
                        fetched_bytes: 0,
                        error: Some(e.to_string()),
                    }
                }
            };
            let _ = tx.send(done).await;
        }
        let _ = tx
            .send(WarmEvent::Summary {
                items: refs.len(),
                ok,
                failed,
                bytes,
                fetched_bytes,
            })
            .await;
    });
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        let event = rx.recv().await?;
        Some((Ok::<_, std::convert::Infallible>(line(&event)), rx))
    });
    let mut response = Response::new(Body::from_stream(stream));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-ndjson"),
    );
    response
}

async fn purge(
    State(state): State<Arc<AppState>>,
    method: Method,
    uri: Uri,
    headers: http::HeaderMap,
    body: Body,
) -> Response {
    let from_query = form_urlencoded::parse(uri.query().unwrap_or("").as_bytes())
        .find(|(k, _)| k == "ref")
        .map(|(_, v)| v.into_owned());
    let text = match from_query {
        Some(text) => text,
        None if method == Method::POST => match read_json::<PurgeRequest>(body).await {
            Ok(r) => r.reference,
            Err(e) => return e.into_response(),
        },
        None => {
            return bad_request(
                ErrorCode::NameInvalid,
                "name the image to purge with ?ref=".into(),
            )
            .into_response()
        }
    };
    let image = match parse_ref(&text) {
        Ok(i) => i,
        Err(e) => return e.into_response(),
    };
    let local = state.proxy.inner().purge(&image).await;
    // Spokes may hold what this mirror (no longer) has: a purge of something not cached here
    // goes into the log too. Each replica logs its own part (a forwarded purge included).
    let position = match &local {
        Ok(_) | Err(PurgeError::NotCached(_)) => {
            Some(state.proxy.inner().purge_log.record(&image.to_string()))
        }
        Err(_) => None,
    };
    let logged = |mut report: PurgeReport| {
        report.purge_log_position = position.map(|p| p.to_string());
        axum::Json::<PurgeReport>(report).into_response()
    };
    // A forwarded purge, or one without other replicas, is this replica's alone.
    let fanout = match &state.purge_fanout {
        Some(f) if !headers.contains_key(purge_fanout::FORWARDED_HEADER) => f,
        _ => {
            return match local {
                Ok(report) => logged(report),
                Err(e) => not_cached_note(e.to_oci(), position).into_response(),
            }
        }
    };
    // Every replica has the same registries and pins: what this one refuses for those
    // reasons, every one would.
    if let Err(e @ (PurgeError::NotMirrored(_) | PurgeError::Pinned(_))) = &local {
        return e.to_oci().into_response();
    }
    let mut results = vec![(
        fanout.self_url().to_owned(),
        purge_fanout::local_outcome(local),
    )];
    results.extend(fanout.forward_all(&image).await);
    match purge_fanout::combine(&image.to_string(), results) {
        Ok(report) => logged(report),
        Err(e) => not_cached_note(e, position).into_response(),
    }
}

/// A 404 of a purge that went into the purge log all the same says so: spokes drop what they
/// hold of it. Pure.
pub fn not_cached_note(
    mut error: OciError,
    position: Option<crate::purge_log::Position>,
) -> OciError {
    if let (StatusCode::NOT_FOUND, Some(p)) = (error.status, position) {
        error.message = format!(
            "{}; recorded in the purge log ({p}): spokes drop it on their next request to this mirror",
            error.message
        );
    }
    error
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_warm_request_is_refused_whole_when_one_reference_or_the_platform_is_bad() {
        let ok = WarmRequest {
            refs: vec!["nginx:stable".into(), "ghcr.io/org/app:1".into()],
            platform: Some("linux/arm64".into()),
        };
        let (refs, platform) = validate_warm(&ok).unwrap();
        assert_eq!(refs[0].to_string(), "docker.io/library/nginx:stable");
        assert_eq!(platform.unwrap().architecture, "arm64");

        let bad_ref = WarmRequest {
            refs: vec!["nginx".into(), "Bad:ref".into()],
            platform: None,
        };
        let e = validate_warm(&bad_ref).unwrap_err();
        assert_eq!(
            (e.status, e.code),
            (StatusCode::BAD_REQUEST, ErrorCode::NameInvalid)
        );
        assert!(e.message.contains("Bad:ref"), "{}", e.message);

        let bad_platform = WarmRequest {
            platform: Some("amd64".into()),
            ..ok
        };
        assert!(validate_warm(&bad_platform).is_err());
        assert!(validate_warm(&WarmRequest::default()).is_err());
    }

    #[test]
    fn progress_lines_round_trip_as_tagged_json() {
        let done = WarmEvent::Done {
            item: 1,
            reference: "docker.io/library/a:1".into(),
            outcome: Outcome::Failed,
            manifests: 0,
            blobs: 0,
            bytes: 0,
            fetched_bytes: 0,
            error: Some("boom".into()),
        };
        let text = line(&done);
        assert!(text.ends_with(b"\n"));
        let value: serde_json::Value = serde_json::from_slice(&text).unwrap();
        assert_eq!(value["event"], "done");
        assert_eq!(value["outcome"], "failed");
        assert_eq!(value["fetchedBytes"], 0);
        assert_eq!(serde_json::from_value::<WarmEvent>(value).unwrap(), done);
    }
}
