//! The HTTP surface, as two routers served on two listeners: the public one (the distribution
//! pull API under `/v2/`, plus `/healthz` and `/readyz`) and the admin one (`/metrics`, `/stats`,
//! `/healthz`, `/readyz` and everything under `/admin/`, see `admin`).
//!
//! Invariant: nothing but the pull API and health leaves through the public listener. `/metrics`,
//! `/stats` and `/admin/...` asked there get a 404 OCI error envelope, and the admin listener
//! answers anything it does not route (`/v2/` included) the same way.
//!
//! Every distribution request is parsed once into a typed [`Route`]; every error leaves through
//! [`OciError`]. `ns` selects the upstream from the configured allowlist and is never used to
//! build a URL to anywhere else.

pub mod admin;
pub mod auth;
pub mod purge_fanout;
pub mod range;

use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use bytes::Bytes;
use futures::StreamExt as _;
use http::{header, HeaderMap, HeaderValue, Method, StatusCode, Uri};
use tracing::Instrument as _;

use crate::fleet;
use crate::oci::{Addressed, Digest, ErrorCode, Kind, OciError, Reference, RepositoryName, Route};
use crate::proxy::blobs::{self, Source};
use crate::proxy::{self, ManifestReply, Proxy, ProxyError};
use crate::telemetry::{CacheResult, Telemetry};
use crate::upstream::{self, Upstream};

/// Shared state of the HTTP handlers.
#[derive(Debug)]
pub struct AppState {
    pub proxy: Proxy,
    pub telemetry: Arc<Telemetry>,
    pub default_registry: String,
    /// With `cluster` replicas: where a purge is forwarded.
    pub purge_fanout: Option<purge_fanout::PurgeFanout>,
}

/// The public listener's router: the pull API (`/v2/`) and the health endpoints.
pub fn public_router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route(
            crate::purge_log::PAGE_PATH,
            get(purge_log_page).fallback(purge_log_method),
        )
        .fallback(public_fallback)
        .with_state(state)
}

/// The admin listener's router: metrics, stats, health and the `/admin/` routes.
pub fn admin_router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/stats", get(stats))
        .merge(admin::routes())
        .fallback(admin_fallback)
        .with_state(state)
}

/// Whether `path` belongs to the admin listener only (and is refused on the public one).
fn admin_only(path: &str) -> bool {
    matches!(path, "/metrics" | "/stats" | "/admin") || path.starts_with("/admin/")
}

/// The 404 of a path the listener that received it does not serve.
fn not_served_here(path: &str, listener: &str) -> Response {
    let shown: String = path.chars().take(64).collect();
    OciError::new(
        StatusCode::NOT_FOUND,
        ErrorCode::Unsupported,
        format!("`{shown}` is not served on the {listener} listener"),
    )
    .into_response()
}

async fn public_fallback(
    state: State<Arc<AppState>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    if admin_only(uri.path()) {
        return with_api_version(not_served_here(uri.path(), "public"));
    }
    distribution(state, method, uri, headers).await
}

/// The admin listener's other paths: `/v2/` for a request another replica of this `cluster`
/// forwarded (they come here when the public listener has TLS or a token, see
/// [`upstream::peers::peer_base`]); anything else is a 404.
async fn admin_fallback(
    state: State<Arc<AppState>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    if forwarded_by_a_peer(&state, uri.path(), &headers) {
        return distribution(state, method, uri, headers).await;
    }
    not_served_here(uri.path(), "admin")
}

/// Whether a request on the admin listener is a replica's forwarded pull: this registry has
/// peers, the path is under `/v2/` and the request names its sender.
fn forwarded_by_a_peer(state: &AppState, path: &str, headers: &HeaderMap) -> bool {
    state.proxy.inner().peers.is_some()
        && (path == "/v2" || path.starts_with("/v2/"))
        && headers.contains_key(upstream::FORWARDED_BY)
}

async fn readyz(State(state): State<Arc<AppState>>) -> Response {
    // Ready when the cache directory is still there and writable enough to list.
    match std::fs::metadata(state.proxy.inner().store.root().join("tmp")) {
        Ok(m) if m.is_dir() => "ok".into_response(),
        _ => (StatusCode::SERVICE_UNAVAILABLE, "storage unavailable").into_response(),
    }
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.telemetry.encode(),
    )
        .into_response()
}

async fn stats(State(state): State<Arc<AppState>>) -> Response {
    let mut snapshot = state.telemetry.snapshot();
    snapshot.purge_log = Some(state.proxy.inner().purge_log.stats());
    axum::Json(snapshot).into_response()
}

/// `after` and `epoch` of a purge log page request: both optional (`after` 0, no epoch), and
/// refused when present but malformed. Pure.
pub fn parse_page_query(
    query: Option<&str>,
) -> Result<(u64, Option<crate::purge_log::Epoch>), OciError> {
    let bad = |message: String| {
        OciError::new(
            StatusCode::BAD_REQUEST,
            ErrorCode::PaginationNumberInvalid,
            message,
        )
    };
    let (mut after, mut epoch) = (0, None);
    for (k, v) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
        let shown: String = v.chars().take(32).collect();
        match &*k {
            "after" if !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()) => {
                after = v
                    .parse()
                    .map_err(|_| bad(format!("after is too large: `{shown}`")))?;
            }
            "after" => {
                return Err(bad(format!(
                    "after must be a non-negative integer, not `{shown}`"
                )))
            }
            "epoch" => {
                epoch = Some(v.parse().map_err(|_| {
                    bad(format!(
                        "epoch must be 16 hexadecimal digits, not `{shown}`"
                    ))
                })?);
            }
            _ => {}
        }
    }
    Ok((after, epoch))
}

/// `GET /v2/_cachalot/purges`: one page of this mirror's purge log, for its spokes (see
/// [`crate::purge_log`]). Behind the pull API's client authentication like every `/v2/` path.
async fn purge_log_page(State(state): State<Arc<AppState>>, uri: Uri) -> Response {
    let log = &state.proxy.inner().purge_log;
    let mut response = match parse_page_query(uri.query()) {
        Ok((after, epoch)) => axum::Json(log.page(after, epoch)).into_response(),
        Err(e) => e.into_response(),
    };
    response
        .headers_mut()
        .insert(crate::purge_log::SEQ_HEADER, log.position().header_value());
    with_api_version(response)
}

async fn purge_log_method(method: Method) -> Response {
    let mut response = with_api_version(unsupported_method(&method).into_response());
    response
        .headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
    response
}

/// Query parameters the API understands.
#[derive(Debug, Default)]
struct Query {
    ns: Option<String>,
    n: Option<String>,
    last: Option<String>,
}

fn parse_query(uri: &Uri) -> Query {
    let mut q = Query::default();
    for (k, v) in form_urlencoded::parse(uri.query().unwrap_or("").as_bytes()) {
        match &*k {
            "ns" => q.ns = Some(v.into_owned()),
            "n" => q.n = Some(v.into_owned()),
            "last" => q.last = Some(v.into_owned()),
            _ => {}
        }
    }
    q
}

fn with_api_version(mut response: Response) -> Response {
    response.headers_mut().insert(
        "docker-distribution-api-version",
        HeaderValue::from_static("registry/2.0"),
    );
    response
}

async fn distribution(
    State(state): State<Arc<AppState>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    let span =
        tracing::info_span!("request", %method, path = uri.path(), ns = tracing::field::Empty);
    let started = Instant::now();
    let response = async {
        let query = parse_query(&uri);
        if let Some(ns) = &query.ns {
            tracing::Span::current().record("ns", ns.as_str());
        }
        let response = match handle(&state, &method, &uri, &headers, &query).await {
            Ok(response) => response,
            Err(e) => {
                tracing::info!(status = e.status.as_u16(), code = e.code.as_str(), error = %e.message, "request failed");
                e.into_response()
            }
        };
        let cache = response
            .headers()
            .get("x-cache")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("-")
            .to_owned();
        if let Some(spoke) = fleet::spoke_of(&headers) {
            let served = if response.status().is_client_error() || response.status().is_server_error() {
                Some(CacheResult::Error)
            } else {
                CacheResult::from_header_value(&cache)
            };
            state.telemetry.record_spoke(spoke, served);
        }
        let elapsed_ms = started.elapsed().as_secs_f64() * 1000.0;
        if cache == "HIT" {
            tracing::debug!(status = response.status().as_u16(), cache, elapsed_ms, "served");
        } else {
            tracing::info!(status = response.status().as_u16(), cache, elapsed_ms, "served");
        }
        response
    }
    .instrument(span)
    .await;
    let mut response = with_api_version(response);
    if headers.contains_key(fleet::SPOKE_HEADER) {
        // Spokes learn of purges from this (see `purge_log`).
        response.headers_mut().insert(
            crate::purge_log::SEQ_HEADER,
            state.proxy.inner().purge_log.position().header_value(),
        );
    }
    response
}

fn unsupported_method(method: &Method) -> OciError {
    OciError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        ErrorCode::Unsupported,
        format!("{method} is not supported: this registry is a read-only pull-through cache"),
    )
}

async fn handle(
    state: &AppState,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    query: &Query,
) -> Result<Response, OciError> {
    let allowed = || {
        let names: Vec<&str> = state.proxy.inner().upstreams.names().collect();
        names.join(", ")
    };
    let Addressed { prefix, route } = Addressed::parse(
        uri.path(),
        query.ns.is_some(),
        |r| state.proxy.upstream(r).is_some(),
        allowed,
    )?;
    if matches!(route, Route::Upload) || (method != Method::GET && method != Method::HEAD) {
        let mut response = unsupported_method(method).into_response();
        response
            .headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return Ok(response);
    }
    let head = method == Method::HEAD;
    // A path prefix and `ns` never both apply: with `ns` the path is never read as prefixed.
    let registry = prefix
        .as_deref()
        .or(query.ns.as_deref())
        .unwrap_or(&state.default_registry);
    let upstream = state.proxy.upstream(registry).ok_or_else(|| {
        let shown: String = registry.chars().take(64).collect();
        OciError::new(
            StatusCode::NOT_FOUND,
            ErrorCode::NameUnknown,
            format!(
                "registry `{shown}` is not mirrored here (mirrored: {})",
                allowed()
            ),
        )
    })?;
    let normalise = |name: RepositoryName| name.normalised_for(upstream.name());
    // A request a peer forwarded here is served by this replica, never forwarded again.
    let forwarded = headers.contains_key(upstream::FORWARDED_BY);
    match route {
        Route::Base => Ok(([(header::CONTENT_TYPE, "application/json")], "{}").into_response()),
        Route::Catalog => Ok(catalog(state, query).await),
        Route::Tags { name } => tags(state, upstream, prefix.as_deref(), &name, query).await,
        Route::Manifest { name, reference } => {
            let name = normalise(name);
            let result = match &reference {
                Reference::Digest(d) => {
                    let routed = state.proxy.route(upstream, &d.to_string(), forwarded);
                    state
                        .proxy
                        .manifest_by_digest(&routed, &name, d, head)
                        .await
                }
                Reference::Tag(t) => {
                    let key = format!("{}/{name}:{t}", upstream.name());
                    let routed = state.proxy.route(upstream, &key, forwarded);
                    state.proxy.manifest_by_tag(&routed, &name, t, head).await
                }
            };
            record(state, upstream, Kind::Manifest, &result);
            result
                .map(|reply| manifest_response(state, upstream.name(), reply))
                .map_err(|e| e.to_oci(Kind::Manifest))
        }
        Route::Blob { name, digest } => {
            let name = normalise(name);
            let result = match state.proxy.blob_not_found(upstream.name(), &name, &digest) {
                Some(remembered) => Err(BlobError::Proxy(remembered)),
                None => {
                    let routed = state.proxy.route(upstream, &digest.to_string(), forwarded);
                    let result = if head {
                        blob_head(state, &routed, &name, &digest).await
                    } else {
                        blob_get(state, &routed, &name, &digest, headers).await
                    };
                    if let Err(BlobError::Proxy(e)) = &result {
                        state
                            .proxy
                            .note_blob_failure(upstream.name(), &name, &digest, e);
                    }
                    result
                }
            };
            match result {
                Ok((response, cache)) => {
                    state
                        .telemetry
                        .record_request(upstream.name(), Kind::Blob, cache);
                    Ok(response)
                }
                Err(BlobError::Proxy(e)) => {
                    state
                        .telemetry
                        .record_request(upstream.name(), Kind::Blob, CacheResult::Error);
                    Err(e.to_oci(Kind::Blob))
                }
                Err(BlobError::Range(e, size)) => {
                    let mut response = e.into_response();
                    if let Some(v) =
                        size.and_then(|s| HeaderValue::from_str(&format!("bytes */{s}")).ok())
                    {
                        response.headers_mut().insert(header::CONTENT_RANGE, v);
                    }
                    Ok(response)
                }
            }
        }
        Route::Upload => Err(unsupported_method(method)),
    }
}

fn record(
    state: &AppState,
    upstream: &Upstream,
    kind: Kind,
    result: &Result<ManifestReply, ProxyError>,
) {
    let cache = match result {
        Ok(reply) => reply.cache,
        Err(_) => CacheResult::Error,
    };
    state.telemetry.record_request(upstream.name(), kind, cache);
}

fn cache_headers(response: &mut Response, cache: CacheResult) {
    let headers = response.headers_mut();
    headers.insert("x-cache", HeaderValue::from_static(cache.header_value()));
    if cache == CacheResult::Stale {
        headers.insert(
            header::WARNING,
            HeaderValue::from_static("110 cachalot \"Response is Stale\""),
        );
    }
}

fn digest_header(digest: &Digest) -> HeaderValue {
    // A validated digest is `alg:hex`, always a valid header value.
    HeaderValue::from_str(&digest.to_string()).unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// A manifest answer: the bytes (or none for HEAD) with their type, digest and length, how old
/// the tag's confirmation is (`Age`, and the absolute time for peers), and the upstream budget
/// this registry last saw for `registry` (relayed to spokes and peers, see [`fleet`]).
fn manifest_response(state: &AppState, registry: &str, reply: ManifestReply) -> Response {
    let mut response = match reply.body {
        Some(body) => {
            state.telemetry.add_served_bytes(body.len() as u64);
            Response::new(Body::from(body))
        }
        None => Response::new(Body::empty()),
    };
    let headers = response.headers_mut();
    if let Some(v) = upstream::header_value(&reply.media_type) {
        headers.insert(header::CONTENT_TYPE, v);
    }
    headers.insert("docker-content-digest", digest_header(&reply.digest));
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(reply.size));
    let now = crate::store::now_secs();
    if let Some(checked_at) = reply.checked_at {
        headers.insert(upstream::CHECKED_AT, HeaderValue::from(checked_at));
        headers.insert(
            header::AGE,
            HeaderValue::from(now.saturating_sub(checked_at)),
        );
    }
    if let Some(budget) = state.telemetry.budget(registry) {
        for (name, value) in fleet::budget_headers(&budget, now) {
            headers.insert(name, value);
        }
    }
    headers.insert(
        header::ETAG,
        HeaderValue::from_str(&format!("\"{}\"", reply.digest))
            .unwrap_or_else(|_| HeaderValue::from_static("\"\"")),
    );
    cache_headers(&mut response, reply.cache);
    response
}

enum BlobError {
    Proxy(ProxyError),
    /// A refused `Range`, with the blob size for `Content-Range: bytes */size` on a 416.
    Range(OciError, Option<u64>),
}

impl From<ProxyError> for BlobError {
    fn from(e: ProxyError) -> Self {
        BlobError::Proxy(e)
    }
}

fn range_error(e: range::RangeError) -> BlobError {
    let (status, size) = match e {
        range::RangeError::Unsatisfiable { size } => {
            (StatusCode::RANGE_NOT_SATISFIABLE, Some(size))
        }
        _ => (StatusCode::BAD_REQUEST, None),
    };
    BlobError::Range(
        OciError::new(status, ErrorCode::RangeInvalid, e.to_string()),
        size,
    )
}

/// Headers of every blob response; `length` is the body's length when known.
fn blob_headers(response: &mut Response, digest: &Digest, cache: CacheResult, length: Option<u64>) {
    let headers = response.headers_mut();
    if let Some(length) = length {
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(length));
    }
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    headers.insert("docker-content-digest", digest_header(digest));
    headers.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    cache_headers(response, cache);
}

async fn blob_head(
    state: &AppState,
    upstream: &Arc<Upstream>,
    name: &RepositoryName,
    digest: &Digest,
) -> Result<(Response, CacheResult), BlobError> {
    let inner = state.proxy.inner();
    let shared_size = match (&inner.shared, inner.store.blob_size(digest)) {
        (Some(shared), None) => shared.blob_size(digest).await.map_err(ProxyError::from)?,
        _ => None,
    };
    let (size, cache) = if let Some(size) = inner.store.blob_size(digest).or(shared_size) {
        (Some(size), CacheResult::Hit)
    } else {
        // A blob the cache does not hold is asked about upstream, never answered 404 from here:
        // a chained cachalot relies on that (distribution #4747).
        let (size, _) = blobs::head_upstream(upstream, name, digest).await?;
        (size, CacheResult::Miss)
    };
    let mut response = Response::new(Body::empty());
    blob_headers(&mut response, digest, cache, size);
    Ok((response, cache))
}

async fn blob_get(
    state: &AppState,
    upstream: &Arc<Upstream>,
    name: &RepositoryName,
    digest: &Digest,
    headers: &HeaderMap,
) -> Result<(Response, CacheResult), BlobError> {
    let requested = match headers.get(header::RANGE) {
        Some(v) => Some(
            v.to_str()
                .map_err(|_| range_error(range::RangeError::Malformed))
                .and_then(|s| range::parse(s).map_err(range_error))?,
        ),
        None => None,
    };
    let inner = state.proxy.inner();
    let source = blobs::open_or_fetch(inner, upstream, name, digest)?;
    let (size, cache, flight): (Option<u64>, CacheResult, _) = match source {
        Source::Cached(file, size, pin) => {
            inner.note_shared_use(&crate::store::shared::blob_key(digest));
            let (start, end) = match requested {
                Some(r) => range::resolve(r, size).map_err(range_error)?,
                None => (0, size),
            };
            let stream = blobs::file_stream(file, pin, start, end).boxed();
            return Ok((
                stream_response(
                    state,
                    stream,
                    digest,
                    CacheResult::Hit,
                    size,
                    requested.map(|_| (start, end)),
                ),
                CacheResult::Hit,
            ));
        }
        Source::InFlight {
            flight,
            leader,
            tee,
        } => {
            let announced = flight.header().await?;
            let cache = if leader && !announced.shared {
                CacheResult::Miss
            } else {
                CacheResult::Hit
            };
            if let (None, Some(tee)) = (requested, tee) {
                let body = blobs::leader_stream(flight, tee, announced.size).boxed();
                let mut response = counted_body(state, body);
                blob_headers(&mut response, digest, cache, announced.size);
                return Ok((response, cache));
            }
            (announced.size, cache, flight)
        }
    };
    match (requested, size) {
        (Some(r), Some(size)) => {
            let (start, end) = range::resolve(r, size).map_err(range_error)?;
            let body = blobs::flight_stream(flight, start, Some(end)).boxed();
            Ok((
                stream_response(state, body, digest, cache, size, Some((start, end))),
                cache,
            ))
        }
        (Some(r), None) => {
            // Size unknown until the fetch ends (chunked upstream): serve the range from the cache,
            // or, when the cache could not keep it, following the flight (which continues from
            // the upstream past what its file holds).
            flight.done().await?;
            if let Some((file, size, pin)) =
                inner.store.open_blob(digest).map_err(ProxyError::from)?
            {
                let (start, end) = range::resolve(r, size).map_err(range_error)?;
                let body = blobs::file_stream(file, pin, start, end).boxed();
                return Ok((
                    stream_response(state, body, digest, cache, size, Some((start, end))),
                    cache,
                ));
            }
            let size = flight.size().ok_or_else(|| {
                BlobError::Proxy(ProxyError::Internal(
                    "blob fetch ended without a size".into(),
                ))
            })?;
            let (start, end) = range::resolve(r, size).map_err(range_error)?;
            let body = blobs::flight_stream(flight, start, Some(end)).boxed();
            Ok((
                stream_response(state, body, digest, cache, size, Some((start, end))),
                cache,
            ))
        }
        (None, size) => {
            let body = blobs::flight_stream(flight, 0, size).boxed();
            let mut response = counted_body(state, body);
            blob_headers(&mut response, digest, cache, size);
            Ok((response, cache))
        }
    }
}

type ByteStream = futures::stream::BoxStream<'static, std::io::Result<Bytes>>;

fn counted_body(state: &AppState, stream: ByteStream) -> Response {
    let telemetry = Arc::clone(&state.telemetry);
    let counted = stream.inspect(move |chunk| {
        if let Ok(bytes) = chunk {
            telemetry.add_served_bytes(bytes.len() as u64);
        }
    });
    Response::new(Body::from_stream(counted))
}

fn stream_response(
    state: &AppState,
    stream: ByteStream,
    digest: &Digest,
    cache: CacheResult,
    size: u64,
    range: Option<(u64, u64)>,
) -> Response {
    let mut response = counted_body(state, stream);
    let length = match range {
        Some((start, end)) => {
            *response.status_mut() = StatusCode::PARTIAL_CONTENT;
            if let Ok(v) = HeaderValue::from_str(&format!("bytes {start}-{}/{size}", end - 1)) {
                response.headers_mut().insert(header::CONTENT_RANGE, v);
            }
            end - start
        }
        None => size,
    };
    blob_headers(&mut response, digest, cache, Some(length));
    response
}

/// `tags/list` from the cached full list, paginated by the client's `n` and `last`. A client that
/// addressed the registry by path `prefix` gets the name (and the `Link`) in that form.
async fn tags(
    state: &AppState,
    upstream: &Arc<Upstream>,
    prefix: Option<&str>,
    requested: &RepositoryName,
    query: &Query,
) -> Result<Response, OciError> {
    let n = match query.n.as_deref() {
        None => None,
        Some(n) => Some(n.parse::<usize>().map_err(|_| {
            OciError::new(
                StatusCode::BAD_REQUEST,
                ErrorCode::PaginationNumberInvalid,
                format!(
                    "n must be a non-negative integer, not `{}`",
                    n.chars().take(32).collect::<String>()
                ),
            )
        })?),
    };
    let name = requested.normalised_for(upstream.name());
    let (list, cache) = state.proxy.tags_list(upstream, &name).await.map_err(|e| {
        let mut err = e.to_oci(Kind::Manifest);
        if err.code == ErrorCode::ManifestUnknown {
            err.code = ErrorCode::NameUnknown;
        }
        err
    })?;
    let (page, more) = proxy::tags::page(&list.tags, n, query.last.as_deref());
    let shown_name = match prefix {
        Some(prefix) => format!("{prefix}/{}", list.name),
        None => list.name.clone(),
    };
    let mut response = Response::new(Body::from(
        serde_json::json!({ "name": shown_name, "tags": page }).to_string(),
    ));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json; charset=utf-8"),
    );
    if let (true, Some(n), Some(last)) = (more, n, page.last()) {
        let mut next = form_urlencoded::Serializer::new(String::new());
        next.append_pair("n", &n.to_string());
        next.append_pair("last", last);
        if let Some(ns) = &query.ns {
            next.append_pair("ns", ns);
        }
        let path = match prefix {
            Some(prefix) => format!("{prefix}/{requested}"),
            None => requested.to_string(),
        };
        let link = format!("</v2/{path}/tags/list?{}>; rel=\"next\"", next.finish());
        if let Ok(v) = HeaderValue::from_str(&link) {
            response.headers_mut().insert(header::LINK, v);
        }
    }
    cache_headers(&mut response, cache);
    Ok(response)
}

/// The cached repositories of `registry`: the local store's, and with a shared tier the bucket's
/// too (when the bucket cannot be listed, the local ones alone).
async fn cached_repositories(state: &AppState, registry: &str) -> Vec<String> {
    let inner = state.proxy.inner();
    let mut all = inner.store.repositories(registry);
    if let Some(shared) = &inner.shared {
        match shared.repositories(registry).await {
            Ok(remote) => {
                all.extend(remote);
                all.sort();
                all.dedup();
            }
            Err(e) => {
                tracing::info!(registry, error = %e, "catalog: the shared storage cannot be listed; local repositories only")
            }
        }
    }
    all
}

/// `_catalog` in the client's own namespace. With `ns`: that registry's repositories as it names
/// them. Without: every name this endpoint serves without `ns`, so each entry can be pulled as
/// listed: the default registry's repositories bare, every other registry's behind its path
/// prefix (`ghcr.io/org/app`).
async fn catalog(state: &AppState, query: &Query) -> Response {
    let mut all = match query.ns.as_deref() {
        Some(ns) => cached_repositories(state, ns).await,
        None => {
            let registries: Vec<String> = state
                .proxy
                .inner()
                .upstreams
                .names()
                .map(str::to_owned)
                .collect();
            let mut all = Vec::new();
            for registry in registries {
                let repositories = cached_repositories(state, &registry).await;
                if registry == state.default_registry {
                    all.extend(repositories);
                } else {
                    all.extend(repositories.into_iter().map(|r| format!("{registry}/{r}")));
                }
            }
            all
        }
    };
    all.sort();
    all.dedup();
    let start = match &query.last {
        Some(last) => all.partition_point(|r| r <= last),
        None => 0,
    };
    let n = query
        .n
        .as_deref()
        .and_then(|n| n.parse::<usize>().ok())
        .unwrap_or(1000)
        .min(10_000);
    let page: Vec<&String> = all.iter().skip(start).take(n).collect();
    let mut response = axum::Json(serde_json::json!({ "repositories": page })).into_response();
    if start + page.len() < all.len() {
        if let Some(last) = page.last() {
            let link = format!("</v2/_catalog?n={n}&last={last}>; rel=\"next\"");
            if let Ok(v) = HeaderValue::from_str(&link) {
                response.headers_mut().insert(header::LINK, v);
            }
        }
    }
    response
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::{admin_only, parse_page_query};
    use crate::oci::ErrorCode;
    use crate::purge_log::Epoch;

    #[test]
    fn a_purge_log_page_query_is_checked_strictly() {
        assert_eq!(parse_page_query(None).unwrap(), (0, None));
        assert_eq!(
            parse_page_query(Some("after=12&epoch=00000000000000ff")).unwrap(),
            (12, Some(Epoch(0xff)))
        );
        for bad in [
            "after=",
            "after=-1",
            "after=1.5",
            "after=abc",
            "after=99999999999999999999999",
            "epoch=xyz",
            "epoch=ff",
        ] {
            let e = parse_page_query(Some(bad)).unwrap_err();
            assert_eq!(e.status, http::StatusCode::BAD_REQUEST, "{bad}");
            assert_eq!(e.code, ErrorCode::PaginationNumberInvalid, "{bad}");
        }
    }

    #[test]
    fn metrics_stats_and_admin_paths_are_admin_only() {
        for path in ["/metrics", "/stats", "/admin", "/admin/", "/admin/purge/x"] {
            assert!(admin_only(path), "{path}");
        }
        for path in [
            "/v2/",
            "/v2/library/metrics/manifests/1",
            "/healthz",
            "/readyz",
            "/administrator",
            "/metricsx",
            "/",
        ] {
            assert!(!admin_only(path), "{path}");
        }
    }
}
