//! `FaultProxy`: an in-process HTTP server on 127.0.0.1 that forwards to a real registry and
//! injects the failures Docker Hub and flaky networks produce, controlled at runtime.
//!
//! Per request, in this order:
//! 1. "down" mode drops the connection without a response;
//! 2. the `ns` query value is recorded (what a mirror forwarded);
//! 3. `/token` is answered locally when token auth is on, after the fault rules that name
//!    [`Kind::Token`] (a token service that fails, hangs or answers garbage);
//! 4. token auth: a missing, expired or out-of-scope Bearer token gets 401 with a challenge;
//! 5. the abuse limit answers a bare 429 to everything;
//! 6. the pull limit answers 429 with Docker Hub's JSON body once N counted manifest GETs passed;
//! 7. fault rules: delays add up, then the first matching status/reset/truncate/corrupt applies;
//! 8. otherwise the request is forwarded and the response streamed back (never buffered).
//!
//! Invariants: only manifest GETs are counted against the pull limit (HEAD is free, as on Docker
//! Hub); every manifest GET/HEAD response carries `ratelimit-*` headers while a limit is set;
//! truncation keeps the upstream's `Content-Length` and closes early; corruption keeps the length.
//! Every request is counted by (method, kind, status), status `None` meaning "no response".
//!
//! [`FaultProxy::start_with`] can serve HTTPS (a certificate given as PEM) and name a public URL
//! for its token realm, so that clients inside a test cluster, which reach it at another address,
//! are sent to a realm they can reach.

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use bytes::{Bytes, BytesMut};
use futures::{Stream, StreamExt, TryStreamExt};
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{combinators::UnsyncBoxBody, BodyDataStream, BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::TokioIo;
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;
use tokio::task::JoinSet;

use crate::client::{http_client, BuildClientError};

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type ProxyBody = UnsyncBoxBody<Bytes, BoxError>;

/// Docker Hub's pull-limit message, verbatim.
pub const TOO_MANY_REQUESTS_MESSAGE: &str = "You have reached your pull rate limit. You may increase the limit by authenticating and upgrading: https://www.docker.com/increase-rate-limit";

/// The pull-limit window Docker Hub advertises (`w=21600`, six hours).
pub const RATE_LIMIT_WINDOW_SECS: u64 = 21_600;

/// What a request path addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    /// `/v2/`.
    Base,
    /// `/v2/<name>/manifests/<reference>`.
    Manifest,
    /// `/v2/<name>/blobs/<digest>`.
    Blob,
    /// `/v2/<name>/blobs/uploads/...` (pushes).
    Upload,
    /// `/v2/<name>/tags/list`.
    Tags,
    /// `/v2/_catalog`.
    Catalog,
    /// `/token` (answered by the proxy when token auth is on).
    Token,
    /// Anything else.
    Other,
}

/// Classifies a request path and extracts the repository name. Pure.
#[must_use]
pub fn classify(path: &str) -> (Kind, Option<String>) {
    if path == "/v2" || path == "/v2/" {
        return (Kind::Base, None);
    }
    if path == "/token" {
        return (Kind::Token, None);
    }
    let Some(rest) = path.strip_prefix("/v2/") else {
        return (Kind::Other, None);
    };
    if rest == "_catalog" {
        return (Kind::Catalog, None);
    }
    for (marker, kind) in [
        ("/blobs/uploads", Kind::Upload),
        ("/manifests/", Kind::Manifest),
        ("/blobs/", Kind::Blob),
    ] {
        if let Some(at) = rest.rfind(marker) {
            if at > 0 {
                return (kind, Some(rest[..at].to_owned()));
            }
        }
    }
    if let Some(name) = rest.strip_suffix("/tags/list") {
        if !name.is_empty() {
            return (Kind::Tags, Some(name.to_owned()));
        }
    }
    (Kind::Other, None)
}

/// A failure to inject.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// Answer this status without forwarding (plain-text body).
    Status(u16),
    /// Wait this long before handling the request further. Delays of several rules add up.
    Delay(Duration),
    /// Close the connection without any response.
    Reset,
    /// Forward, keep the upstream's `Content-Length`, but close after this many body bytes.
    Truncate {
        /// Body bytes sent before closing.
        after: u64,
    },
    /// Forward, but pause for `pause` after this many body bytes (a stalled transfer, so a test
    /// can act while a body is known to be half way through).
    Stall {
        /// Body bytes sent before the pause.
        after: u64,
        /// How long the body then stops.
        pause: Duration,
    },
    /// Forward with the byte at this offset flipped (`!b`); offsets past the end flip the last byte.
    Corrupt {
        /// Body offset of the flipped byte.
        at: u64,
    },
    /// Answer this response without forwarding (an HTML login page, JSON without the expected
    /// field, garbage).
    Respond {
        /// Status code.
        status: u16,
        /// `Content-Type` header.
        content_type: String,
        /// The whole body.
        body: String,
    },
    /// Answer 200 with a body that never ends (chunked, no `Content-Length`): what a reader
    /// without a size bound would read forever.
    EndlessBody {
        /// `Content-Type` header.
        content_type: String,
    },
}

/// Which requests a fault applies to, and how often.
#[derive(Debug, Clone)]
pub struct FaultRule {
    /// The fault.
    pub fault: Fault,
    /// Only requests of this kind (any kind if `None`).
    pub kind: Option<Kind>,
    /// Only this method (any if `None`).
    pub method: Option<Method>,
    /// Only paths containing this text (any if `None`).
    pub path_contains: Option<String>,
    /// Only the next N matching requests (forever if `None`).
    pub times: Option<u64>,
}

impl FaultRule {
    /// A rule applying `fault` to every request.
    #[must_use]
    pub fn new(fault: Fault) -> Self {
        Self {
            fault,
            kind: None,
            method: None,
            path_contains: None,
            times: None,
        }
    }
    /// Restricts the rule to one request kind.
    #[must_use]
    pub fn kind(mut self, kind: Kind) -> Self {
        self.kind = Some(kind);
        self
    }
    /// Restricts the rule to one method.
    #[must_use]
    pub fn method(mut self, method: Method) -> Self {
        self.method = Some(method);
        self
    }
    /// Restricts the rule to paths containing `text`.
    #[must_use]
    pub fn path_contains(mut self, text: &str) -> Self {
        self.path_contains = Some(text.to_owned());
        self
    }
    /// Applies the rule to the next `n` matching requests only.
    #[must_use]
    pub fn times(mut self, n: u64) -> Self {
        self.times = Some(n);
        self
    }

    fn matches(&self, method: &Method, kind: Kind, path: &str) -> bool {
        self.kind.is_none_or(|k| k == kind)
            && self.method.as_ref().is_none_or(|m| m == method)
            && self
                .path_contains
                .as_deref()
                .is_none_or(|t| path.contains(t))
            && self.times != Some(0)
    }
}

/// Identifies an installed fault rule, for [`FaultHandle::remove_fault`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FaultId(u64);

/// Docker Hub's pull limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateLimit {
    /// Counted manifest GETs allowed before 429.
    pub limit: u64,
    /// `Retry-After` seconds on the 429.
    pub retry_after_secs: u64,
}

/// Docker Hub-style Bearer token auth in front of the upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenAuth {
    /// The `service` named in challenges.
    pub service: String,
    /// `Some((user, password))` makes `/token` require these HTTP basic credentials.
    pub credentials: Option<(String, String)>,
    /// Token lifetime in seconds (`expires_in`).
    pub expires_in_secs: u64,
}

impl Default for TokenAuth {
    fn default() -> Self {
        Self {
            service: "test-registry".to_owned(),
            credentials: None,
            expires_in_secs: 300,
        }
    }
}

/// Snapshot of request counts by (method, kind, status); status `None` = connection dropped.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counts {
    /// The raw counters.
    pub entries: BTreeMap<(String, Kind, Option<u16>), u64>,
}

impl Counts {
    /// Requests with this method and kind, whatever the outcome.
    #[must_use]
    pub fn get(&self, method: &str, kind: Kind) -> u64 {
        self.entries
            .iter()
            .filter(|((m, k, _), _)| m == method && *k == kind)
            .map(|(_, n)| n)
            .sum()
    }
    /// Requests with this method, kind and answered status.
    #[must_use]
    pub fn with_status(&self, method: &str, kind: Kind, status: u16) -> u64 {
        self.entries
            .get(&(method.to_owned(), kind, Some(status)))
            .copied()
            .unwrap_or(0)
    }
    /// Requests of this kind, any method.
    #[must_use]
    pub fn kind_total(&self, kind: Kind) -> u64 {
        self.entries
            .iter()
            .filter(|((_, k, _), _)| *k == kind)
            .map(|(_, n)| n)
            .sum()
    }
    /// Manifest GETs, the requests Docker Hub counts against the pull limit (HEAD is free).
    #[must_use]
    pub fn counted_manifest_gets(&self) -> u64 {
        self.get("GET", Kind::Manifest)
    }
    /// All requests.
    #[must_use]
    pub fn total(&self) -> u64 {
        self.entries.values().sum()
    }
}

/// One request as the proxy saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestRecord {
    /// Method.
    pub method: String,
    /// Path.
    pub path: String,
    /// Raw query string, if any.
    pub query: Option<String>,
    /// Kind.
    pub kind: Kind,
    /// Status answered, `None` when the connection was dropped.
    pub status: Option<u16>,
}

/// Records kept per proxy; later requests are counted but not recorded.
const MAX_RECORDS: usize = 100_000;

#[derive(Debug, Default)]
struct Settings {
    rate_limit: Option<RateLimit>,
    /// `w=` advertised instead of [`RATE_LIMIT_WINDOW_SECS`].
    rate_limit_window: Option<u64>,
    counted_gets: u64,
    abuse_limit: bool,
    down: bool,
    rules: Vec<(FaultId, FaultRule)>,
    next_rule: u64,
    auth: Option<TokenAuth>,
    /// The realm named in challenges instead of `<public url>/token`.
    token_realm: Option<String>,
    tokens: HashMap<String, IssuedToken>,
    issued: u64,
}

#[derive(Debug, Clone)]
struct IssuedToken {
    scopes: Vec<String>,
    expires: Instant,
}

#[derive(Debug, Default)]
struct Stats {
    counts: Counts,
    ns: BTreeMap<String, u64>,
    token_requests: BTreeMap<String, u64>,
    body_bytes: BTreeMap<Kind, u64>,
    records: Vec<RequestRecord>,
}

#[derive(Debug)]
struct Shared {
    addr: SocketAddr,
    /// The base URL clients use (token realms point there).
    public_url: String,
    /// `https` or `http`.
    scheme: &'static str,
    upstream: String,
    client: reqwest::Client,
    settings: Mutex<Settings>,
    stats: Mutex<Stats>,
}

/// Recovers the guard of a poisoned mutex: counters stay usable after a panicking test thread.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A cloneable remote control for a running [`FaultProxy`].
#[derive(Debug, Clone)]
pub struct FaultHandle {
    shared: Arc<Shared>,
}

impl FaultHandle {
    /// Request counts so far.
    #[must_use]
    pub fn counts(&self) -> Counts {
        lock(&self.shared.stats).counts.clone()
    }
    /// Every request recorded so far (up to 100 000), oldest first.
    #[must_use]
    pub fn requests(&self) -> Vec<RequestRecord> {
        lock(&self.shared.stats).records.clone()
    }
    /// How often each `ns` query value was seen.
    #[must_use]
    pub fn ns_seen(&self) -> BTreeMap<String, u64> {
        lock(&self.shared.stats).ns.clone()
    }
    /// `/token` requests by requested scope (scopes joined by a space, `""` for none).
    #[must_use]
    pub fn token_requests(&self) -> BTreeMap<String, u64> {
        lock(&self.shared.stats).token_requests.clone()
    }
    /// Response body bytes sent to clients, by request kind (what an upstream "paid" in
    /// bandwidth; truncated bodies count what was sent).
    #[must_use]
    pub fn body_bytes(&self) -> BTreeMap<Kind, u64> {
        lock(&self.shared.stats).body_bytes.clone()
    }
    /// Forgets counts, records, `ns` values, token requests and byte counts (not the settings).
    pub fn reset_counts(&self) {
        *lock(&self.shared.stats) = Stats::default();
    }
    /// Sets (or with `None` lifts) the pull limit; the counted-GET budget starts over.
    pub fn set_rate_limit(&self, limit: Option<RateLimit>) {
        let mut settings = lock(&self.shared.settings);
        settings.rate_limit = limit;
        settings.counted_gets = 0;
    }
    /// Advertises `w=SECONDS` in the `ratelimit-*` headers instead of Docker Hub's six hours (or
    /// with `None` goes back to that), so tests can see a figure outlive its window. The counting
    /// itself is unchanged: the window is only what the headers say.
    pub fn set_rate_limit_window(&self, seconds: Option<u64>) {
        lock(&self.shared.settings).rate_limit_window = seconds;
    }
    /// Remaining counted manifest GETs, if a limit is set.
    #[must_use]
    pub fn rate_limit_remaining(&self) -> Option<u64> {
        let settings = lock(&self.shared.settings);
        settings
            .rate_limit
            .as_ref()
            .map(|l| l.limit.saturating_sub(settings.counted_gets))
    }
    /// Turns the abuse limit (a bare 429 to every request) on or off.
    pub fn set_abuse_limit(&self, on: bool) {
        lock(&self.shared.settings).abuse_limit = on;
    }
    /// Turns "down" mode (every connection dropped without a response) on or off.
    pub fn set_down(&self, down: bool) {
        lock(&self.shared.settings).down = down;
    }
    /// Installs a fault rule after the existing ones.
    pub fn add_fault(&self, rule: FaultRule) -> FaultId {
        let mut settings = lock(&self.shared.settings);
        settings.next_rule += 1;
        let id = FaultId(settings.next_rule);
        settings.rules.push((id, rule));
        id
    }
    /// Removes one fault rule.
    pub fn remove_fault(&self, id: FaultId) {
        lock(&self.shared.settings).rules.retain(|(i, _)| *i != id);
    }
    /// Removes every fault rule.
    pub fn clear_faults(&self) {
        lock(&self.shared.settings).rules.clear();
    }
    /// Requires Bearer tokens from the proxy's own `/token` endpoint.
    pub fn enable_token_auth(&self, auth: TokenAuth) {
        lock(&self.shared.settings).auth = Some(auth);
    }
    /// Stops requiring tokens.
    pub fn disable_token_auth(&self) {
        lock(&self.shared.settings).auth = None;
    }
    /// Invalidates every issued token, as if they had all expired.
    pub fn revoke_tokens(&self) {
        lock(&self.shared.settings).tokens.clear();
    }
    /// Names this URL as the realm in challenges (`None`: the proxy's own `<public url>/token`).
    /// Tokens are still issued by this proxy's `/token` when the realm leads back to it, for
    /// example through another host name (`http://localhost:PORT/token`); a realm elsewhere (a
    /// closed port) makes token requests fail as that address does.
    pub fn set_token_realm(&self, realm: Option<String>) {
        lock(&self.shared.settings).token_realm = realm;
    }
    /// The proxy's URL.
    #[must_use]
    pub fn url(&self) -> String {
        format!("{}://{}", self.shared.scheme, self.shared.addr)
    }
}

/// How a [`FaultProxy`] serves.
#[derive(Debug, Clone, Default)]
pub struct FaultProxyOptions {
    /// Serve HTTPS with this certificate chain and key (PEM) instead of plain HTTP.
    pub tls: Option<(String, String)>,
    /// The base URL clients reach the proxy at (`https://10.250.0.10`), used in token realms;
    /// [`FaultHandle::url`] when unset.
    pub public_url: Option<String>,
}

/// Why a [`FaultProxy`] could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartFaultProxyError {
    /// Binding 127.0.0.1:0 failed.
    #[error("bind fault proxy on 127.0.0.1")]
    Bind {
        /// The I/O error.
        source: std::io::Error,
    },
    /// The forwarding client could not be built.
    #[error(transparent)]
    BuildClient(#[from] BuildClientError),
    /// The TLS certificate or key was not usable.
    #[error("fault proxy TLS: {0}")]
    Tls(String),
}

/// A running fault-injecting proxy; stops (and drops every connection) when dropped.
#[derive(Debug)]
pub struct FaultProxy {
    handle: FaultHandle,
    task: tokio::task::JoinHandle<()>,
}

impl FaultProxy {
    /// Starts a proxy on a free 127.0.0.1 port forwarding to `upstream_url`
    /// (`http://127.0.0.1:PORT`, no trailing slash needed). Must run inside a tokio runtime.
    ///
    /// # Errors
    /// See [`StartFaultProxyError`].
    pub async fn start(upstream_url: &str) -> Result<Self, StartFaultProxyError> {
        Self::start_with(upstream_url, FaultProxyOptions::default()).await
    }

    /// [`FaultProxy::start`] with options (HTTPS, a public URL for token realms).
    ///
    /// # Errors
    /// See [`StartFaultProxyError`].
    pub async fn start_with(
        upstream_url: &str,
        options: FaultProxyOptions,
    ) -> Result<Self, StartFaultProxyError> {
        let listener = TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
            .await
            .map_err(|source| StartFaultProxyError::Bind { source })?;
        let addr = listener
            .local_addr()
            .map_err(|source| StartFaultProxyError::Bind { source })?;
        let acceptor = options
            .tls
            .as_ref()
            .map(|(cert, key)| tls_acceptor(cert, key))
            .transpose()?;
        let scheme = if acceptor.is_some() { "https" } else { "http" };
        let shared = Arc::new(Shared {
            addr,
            public_url: options
                .public_url
                .clone()
                .unwrap_or_else(|| format!("{scheme}://{addr}"))
                .trim_end_matches('/')
                .to_owned(),
            scheme,
            upstream: upstream_url.trim_end_matches('/').to_owned(),
            client: http_client()?,
            settings: Mutex::new(Settings::default()),
            stats: Mutex::new(Stats::default()),
        });
        let task = tokio::spawn(accept_loop(listener, shared.clone(), acceptor));
        Ok(Self {
            handle: FaultHandle { shared },
            task,
        })
    }

    /// A cloneable control handle.
    #[must_use]
    pub fn handle(&self) -> FaultHandle {
        self.handle.clone()
    }

    /// `http://127.0.0.1:PORT`.
    #[must_use]
    pub fn url(&self) -> String {
        self.handle.url()
    }

    /// The listening address.
    #[must_use]
    pub fn addr(&self) -> SocketAddr {
        self.handle.shared.addr
    }
}

impl std::ops::Deref for FaultProxy {
    type Target = FaultHandle;
    fn deref(&self) -> &FaultHandle {
        &self.handle
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        // Aborting the accept loop drops its JoinSet, which aborts every connection task.
        self.task.abort();
    }
}

fn tls_acceptor(
    cert_pem: &str,
    key_pem: &str,
) -> Result<tokio_rustls::TlsAcceptor, StartFaultProxyError> {
    use rustls::pki_types::pem::PemObject as _;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let tls = |e: String| StartFaultProxyError::Tls(e);
    let certs = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| tls(format!("certificate: {e}")))?;
    let key =
        PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|e| tls(format!("key: {e}")))?;
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| tls(e.to_string()))?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .map_err(|e| tls(e.to_string()))?;
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

async fn serve_connection<S>(shared: Arc<Shared>, stream: S)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |request| handle(shared.clone(), request));
    // An Err from the service (a reset fault) makes hyper close without responding.
    let _ = hyper::server::conn::http1::Builder::new()
        .keep_alive(true)
        .serve_connection(TokioIo::new(stream), service)
        .await;
}

async fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    acceptor: Option<tokio_rustls::TlsAcceptor>,
) {
    let mut connections = JoinSet::new();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
        };
        let Ok((stream, _)) = accepted else { continue };
        if lock(&shared.settings).down {
            drop(stream);
            continue;
        }
        let shared = shared.clone();
        let acceptor = acceptor.clone();
        connections.spawn(async move {
            match acceptor {
                Some(acceptor) => {
                    // A handshake that fails or hangs ends the connection, bounded.
                    if let Ok(Ok(tls)) =
                        tokio::time::timeout(Duration::from_secs(10), acceptor.accept(stream)).await
                    {
                        serve_connection(shared, tls).await;
                    }
                }
                None => serve_connection(shared, stream).await,
            }
        });
    }
}

/// Returned by the service to make hyper drop the connection without a response.
#[derive(Debug, thiserror::Error)]
#[error("fault proxy: connection reset by injected fault")]
struct ResetConnection;

enum BodyFault {
    None,
    Truncate(u64),
    Stall(u64, Duration),
    Corrupt(u64),
}

async fn handle(
    shared: Arc<Shared>,
    request: Request<Incoming>,
) -> Result<Response<ProxyBody>, ResetConnection> {
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let query = request.uri().query().map(str::to_owned);
    let (kind, name) = classify(&path);
    let outcome = respond(
        &shared,
        request,
        &method,
        &path,
        query.as_deref(),
        kind,
        name,
    )
    .await;
    let status = outcome.as_ref().ok().map(|r| r.status().as_u16());
    let mut stats = lock(&shared.stats);
    *stats
        .counts
        .entries
        .entry((method.to_string(), kind, status))
        .or_insert(0) += 1;
    for ns in query_values(query.as_deref(), "ns") {
        *stats.ns.entry(ns).or_insert(0) += 1;
    }
    if stats.records.len() < MAX_RECORDS {
        stats.records.push(RequestRecord {
            method: method.to_string(),
            path,
            query,
            kind,
            status,
        });
    }
    drop(stats);
    outcome.map(|response| count_body_bytes(response, shared, kind))
}

/// Wraps a response body so every chunk sent is added to the per-kind byte counter.
fn count_body_bytes(
    response: Response<ProxyBody>,
    shared: Arc<Shared>,
    kind: Kind,
) -> Response<ProxyBody> {
    let (parts, body) = response.into_parts();
    let counted = BodyDataStream::new(body).inspect_ok(move |chunk| {
        *lock(&shared.stats).body_bytes.entry(kind).or_insert(0) += chunk.len() as u64;
    });
    Response::from_parts(
        parts,
        BodyExt::boxed_unsync(StreamBody::new(counted.map_ok(Frame::data))),
    )
}

async fn respond(
    shared: &Shared,
    request: Request<Incoming>,
    method: &Method,
    path: &str,
    query: Option<&str>,
    kind: Kind,
    name: Option<String>,
) -> Result<Response<ProxyBody>, ResetConnection> {
    let auth = {
        let settings = lock(&shared.settings);
        if settings.down {
            return Err(ResetConnection);
        }
        settings.auth.clone()
    };
    if let Some(auth) = &auth {
        if kind == Kind::Token {
            note_token_request(shared, query);
            let (delay, terminal) = take_faults(shared, method, kind, path, true);
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            let body_fault = match canned_response(terminal)? {
                Canned::Response(response) => return Ok(response),
                Canned::Forward(body_fault) => body_fault,
            };
            let issued = issue_token(shared, auth, request.headers(), query);
            return Ok(apply_body_fault(issued, body_fault));
        }
        if let Some(challenge) = check_token(
            shared,
            auth,
            request.headers(),
            method,
            kind,
            name.as_deref(),
        ) {
            return Ok(challenge);
        }
    }

    let manifest_read = kind == Kind::Manifest && (method == Method::GET || method == Method::HEAD);
    let mut ratelimit_headers = None;
    {
        let mut settings = lock(&shared.settings);
        if settings.abuse_limit {
            return Ok(simple(
                StatusCode::TOO_MANY_REQUESTS,
                &[("retry-after", "60".to_owned())],
                Bytes::new(),
            ));
        }
        let counted_gets = settings.counted_gets;
        if let Some(limit) = settings.rate_limit.clone() {
            if manifest_read && method == Method::GET {
                if counted_gets >= limit.limit {
                    let window = settings.rate_limit_window;
                    let headers = rate_limit_headers(&limit, 0, window, shared.addr);
                    let mut all = vec![
                        ("retry-after", limit.retry_after_secs.to_string()),
                        ("content-type", "application/json".to_owned()),
                    ];
                    all.extend(headers);
                    return Ok(simple(
                        StatusCode::TOO_MANY_REQUESTS,
                        &all,
                        Bytes::from(too_many_requests_body()),
                    ));
                }
                settings.counted_gets += 1;
            }
            if manifest_read {
                let remaining = limit.limit.saturating_sub(settings.counted_gets);
                ratelimit_headers = Some(rate_limit_headers(
                    &limit,
                    remaining,
                    settings.rate_limit_window,
                    shared.addr,
                ));
            }
        }
    }

    let (delay, terminal) = take_faults(shared, method, kind, path, false);
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let body_fault = match canned_response(terminal)? {
        Canned::Response(response) => return Ok(response),
        Canned::Forward(body_fault) => body_fault,
    };

    let mut response = forward(shared, request, path, query, auth.is_some()).await;
    if let Some(headers) = ratelimit_headers {
        for (name, value) in headers {
            if let Ok(value) = HeaderValue::from_str(&value) {
                response.headers_mut().insert(name, value);
            }
        }
    }
    Ok(apply_body_fault(response, body_fault))
}

/// Sums the delays of the matching rules and picks the first terminal fault, counting down
/// `times`. With `explicit_kind`, only rules that name the request's kind match (how `/token`
/// faults are chosen, so that kind-less rules keep applying to registry requests only).
fn take_faults(
    shared: &Shared,
    method: &Method,
    kind: Kind,
    path: &str,
    explicit_kind: bool,
) -> (Duration, Option<Fault>) {
    let mut settings = lock(&shared.settings);
    let mut delay = Duration::ZERO;
    let mut terminal = None;
    for (_, rule) in &mut settings.rules {
        if !rule.matches(method, kind, path) || (explicit_kind && rule.kind != Some(kind)) {
            continue;
        }
        match &rule.fault {
            Fault::Delay(d) => delay += *d,
            other if terminal.is_none() => terminal = Some(other.clone()),
            _ => continue,
        }
        if let Some(times) = &mut rule.times {
            *times -= 1;
        }
    }
    settings.rules.retain(|(_, rule)| rule.times != Some(0));
    (delay, terminal)
}

/// What a terminal fault makes of a request: a response of its own, or the real answer with a
/// body fault.
enum Canned {
    Response(Response<ProxyBody>),
    Forward(BodyFault),
}

fn canned_response(terminal: Option<Fault>) -> Result<Canned, ResetConnection> {
    Ok(match terminal {
        Some(Fault::Status(code)) => {
            let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            Canned::Response(simple(
                status,
                &[("content-type", "text/plain".to_owned())],
                Bytes::from_static(b"injected fault\n"),
            ))
        }
        Some(Fault::Respond {
            status,
            content_type,
            body,
        }) => {
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            Canned::Response(simple(
                status,
                &[("content-type", content_type)],
                Bytes::from(body),
            ))
        }
        Some(Fault::EndlessBody { content_type }) => Canned::Response(endless(&content_type)),
        Some(Fault::Reset) => return Err(ResetConnection),
        Some(Fault::Truncate { after }) => Canned::Forward(BodyFault::Truncate(after)),
        Some(Fault::Corrupt { at }) => Canned::Forward(BodyFault::Corrupt(at)),
        Some(Fault::Stall { after, pause }) => Canned::Forward(BodyFault::Stall(after, pause)),
        Some(Fault::Delay(_)) | None => Canned::Forward(BodyFault::None),
    })
}

/// A 200 whose chunked body repeats 64 KiB of `x` until the client hangs up.
fn endless(content_type: &str) -> Response<ProxyBody> {
    let chunk = Bytes::from(vec![b'x'; 64 * 1024]);
    let stream = futures::stream::repeat(chunk).map(|c| Ok::<_, BoxError>(Frame::data(c)));
    let mut response = Response::new(BodyExt::boxed_unsync(StreamBody::new(stream)));
    if let Ok(v) = HeaderValue::from_str(content_type) {
        response.headers_mut().insert(http::header::CONTENT_TYPE, v);
    }
    response
}

fn note_token_request(shared: &Shared, query: Option<&str>) {
    let scopes: Vec<String> = query_values(query, "scope")
        .iter()
        .flat_map(|s| s.split(' ').map(str::to_owned).collect::<Vec<_>>())
        .filter(|s| !s.is_empty())
        .collect();
    *lock(&shared.stats)
        .token_requests
        .entry(scopes.join(" "))
        .or_insert(0) += 1;
}

fn rate_limit_headers(
    limit: &RateLimit,
    remaining: u64,
    window: Option<u64>,
    addr: SocketAddr,
) -> Vec<(&'static str, String)> {
    let window = window.unwrap_or(RATE_LIMIT_WINDOW_SECS);
    vec![
        ("ratelimit-limit", format!("{};w={window}", limit.limit)),
        ("ratelimit-remaining", format!("{remaining};w={window}")),
        ("docker-ratelimit-source", addr.ip().to_string()),
    ]
}

/// Docker Hub's pull-limit 429 body.
#[must_use]
pub fn too_many_requests_body() -> String {
    serde_json::json!({"errors": [{"code": "TOOMANYREQUESTS", "message": TOO_MANY_REQUESTS_MESSAGE}]}).to_string()
}

fn simple(status: StatusCode, headers: &[(&str, String)], body: Bytes) -> Response<ProxyBody> {
    let mut response = Response::new(
        Full::new(body)
            .map_err(|never: Infallible| match never {})
            .boxed_unsync(),
    );
    *response.status_mut() = status;
    for (name, value) in headers {
        if let (Ok(name), Ok(value)) = (
            http::header::HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(value),
        ) {
            response.headers_mut().insert(name, value);
        }
    }
    response
}

const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

async fn forward(
    shared: &Shared,
    request: Request<Incoming>,
    path: &str,
    query: Option<&str>,
    strip_auth: bool,
) -> Response<ProxyBody> {
    let url = match query {
        Some(q) => format!("{}{path}?{q}", shared.upstream),
        None => format!("{}{path}", shared.upstream),
    };
    let (parts, body) = request.into_parts();
    let mut headers = HeaderMap::new();
    for (name, value) in &parts.headers {
        let n = name.as_str();
        if n == "host" || HOP_BY_HOP.contains(&n) || (strip_auth && n == "authorization") {
            continue;
        }
        headers.append(name.clone(), value.clone());
    }
    let mut builder = shared
        .client
        .request(parts.method.clone(), &url)
        .headers(headers);
    if parts.method != Method::GET && parts.method != Method::HEAD {
        builder = builder.body(reqwest::Body::wrap_stream(BodyDataStream::new(body)));
    }
    let upstream = match builder.send().await {
        Ok(upstream) => upstream,
        Err(error) => {
            return simple(
                StatusCode::BAD_GATEWAY,
                &[("content-type", "text/plain".to_owned())],
                Bytes::from(format!("fault proxy: upstream {url} failed: {error}\n")),
            );
        }
    };
    let mut response = Response::builder().status(upstream.status());
    for (name, value) in upstream.headers() {
        if !HOP_BY_HOP.contains(&name.as_str()) {
            response = response.header(name, value);
        }
    }
    let stream = upstream
        .bytes_stream()
        .map_err(|e| -> BoxError { Box::new(e) });
    let body = BodyExt::boxed_unsync(StreamBody::new(stream.map_ok(Frame::data)));
    response.body(body).unwrap_or_else(|_| {
        simple(
            StatusCode::BAD_GATEWAY,
            &[],
            Bytes::from_static(b"fault proxy: bad upstream response\n"),
        )
    })
}

fn apply_body_fault(response: Response<ProxyBody>, fault: BodyFault) -> Response<ProxyBody> {
    let (parts, body) = response.into_parts();
    let data = BodyDataStream::new(body);
    let body = match fault {
        BodyFault::None => {
            return Response::from_parts(
                parts,
                BodyExt::boxed_unsync(StreamBody::new(data.map_ok(Frame::data))),
            )
        }
        BodyFault::Truncate(after) => truncate(data, after).boxed(),
        BodyFault::Stall(after, pause) => stall(data, after, pause).boxed(),
        BodyFault::Corrupt(at) => {
            let length = parts
                .headers
                .get(http::header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok());
            // Past-the-end offsets flip the last byte so the body always differs.
            let at = length.map_or(at, |len| at.min(len.saturating_sub(1)));
            corrupt(data, at).boxed()
        }
    };
    Response::from_parts(
        parts,
        BodyExt::boxed_unsync(StreamBody::new(body.map_ok(Frame::data))),
    )
}

/// How long a truncated body pauses before failing, so its prefix reaches the client.
const FLUSH_GRACE: Duration = Duration::from_millis(50);

/// Passes `after` bytes, then fails the stream so the server aborts the connection.
fn truncate<S>(inner: S, after: u64) -> impl Stream<Item = Result<Bytes, BoxError>> + Send
where
    S: Stream<Item = Result<Bytes, BoxError>> + Send + Unpin,
{
    futures::stream::unfold(
        (inner, 0_u64, false),
        move |(mut inner, sent, done)| async move {
            if done {
                return None;
            }
            if sent >= after {
                // hyper drops buffered output when a body fails, so give it time to flush the head
                // and the prefix; the client must see a short body, not a missing response.
                tokio::time::sleep(FLUSH_GRACE).await;
                let cut: BoxError = "fault proxy: body truncated by injected fault".into();
                return Some((Err(cut), (inner, sent, true)));
            }
            match inner.next().await {
                Some(Ok(chunk)) => {
                    let room = after.saturating_sub(sent);
                    if (chunk.len() as u64) < room {
                        let next = sent + chunk.len() as u64;
                        Some((Ok(chunk), (inner, next, false)))
                    } else {
                        let keep = usize::try_from(room).unwrap_or(usize::MAX);
                        let cut: BoxError = "fault proxy: body truncated by injected fault".into();
                        if keep == 0 {
                            tokio::time::sleep(FLUSH_GRACE).await;
                            Some((Err(cut), (inner, sent, true)))
                        } else {
                            // Emit the allowed prefix now; the next poll ends the body with an error.
                            let prefix = chunk.slice(..keep);
                            Some((Ok(prefix), (inner, after, false)))
                        }
                    }
                }
                Some(Err(error)) => Some((Err(error), (inner, sent, true))),
                None => None,
            }
        },
    )
}

/// Passes `after` bytes, pauses for `pause` (once), then passes the rest.
fn stall<S>(
    inner: S,
    after: u64,
    pause: Duration,
) -> impl Stream<Item = Result<Bytes, BoxError>> + Send
where
    S: Stream<Item = Result<Bytes, BoxError>> + Send + Unpin,
{
    futures::stream::unfold(
        (inner, 0_u64, false, Option::<Bytes>::None),
        move |(mut inner, sent, paused, held)| async move {
            let chunk = match held {
                Some(rest) => rest,
                None => match inner.next().await? {
                    Ok(chunk) => chunk,
                    Err(error) => return Some((Err(error), (inner, sent, paused, None))),
                },
            };
            if !paused && sent >= after {
                tokio::time::sleep(pause).await;
                let next = sent + chunk.len() as u64;
                return Some((Ok(chunk), (inner, next, true, None)));
            }
            if !paused && sent + chunk.len() as u64 > after {
                let keep = usize::try_from(after - sent).unwrap_or(chunk.len());
                let (prefix, rest) = (chunk.slice(..keep), chunk.slice(keep..));
                return Some((Ok(prefix), (inner, after, false, Some(rest))));
            }
            let next = sent + chunk.len() as u64;
            Some((Ok(chunk), (inner, next, paused, None)))
        },
    )
}

/// Flips the byte at offset `at` (same length).
fn corrupt<S>(inner: S, at: u64) -> impl Stream<Item = Result<Bytes, BoxError>> + Send
where
    S: Stream<Item = Result<Bytes, BoxError>> + Send,
{
    let mut offset = 0_u64;
    inner.map_ok(move |chunk| {
        let start = offset;
        offset += chunk.len() as u64;
        if at >= start && at < offset {
            let mut copy = BytesMut::from(&chunk[..]);
            let i = usize::try_from(at - start).unwrap_or(0);
            copy[i] = !copy[i];
            copy.freeze()
        } else {
            chunk
        }
    })
}

/// All values of a query parameter, percent-decoded.
fn query_values(query: Option<&str>, key: &str) -> Vec<String> {
    query
        .map(|q| {
            url::form_urlencoded::parse(q.as_bytes())
                .filter(|(k, _)| k == key)
                .map(|(_, v)| v.into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// The scope a request needs (`None` for the base endpoint: any valid token will do).
fn required_scope(method: &Method, kind: Kind, name: Option<&str>) -> Option<String> {
    match (kind, name) {
        (Kind::Catalog, _) => Some("registry:catalog:*".to_owned()),
        (_, Some(name)) => {
            let action = if method == Method::GET || method == Method::HEAD {
                "pull"
            } else {
                "push"
            };
            Some(format!("repository:{name}:{action}"))
        }
        _ => None,
    }
}

/// Whether a granted scope (`type:name:a,b`) covers a required one (`type:name:a`). Pure.
#[must_use]
pub fn scope_covers(granted: &str, required: &str) -> bool {
    let (Some((g_res, g_actions)), Some((r_res, r_action))) =
        (granted.rsplit_once(':'), required.rsplit_once(':'))
    else {
        return false;
    };
    g_res == r_res && g_actions.split(',').any(|a| a == r_action || a == "*")
}

fn check_token(
    shared: &Shared,
    auth: &TokenAuth,
    headers: &HeaderMap,
    method: &Method,
    kind: Kind,
    name: Option<&str>,
) -> Option<Response<ProxyBody>> {
    let required = required_scope(method, kind, name);
    let presented = headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_owned);
    let valid = presented.is_some_and(|token| {
        let settings = lock(&shared.settings);
        settings.tokens.get(&token).is_some_and(|issued| {
            issued.expires > Instant::now()
                && required
                    .as_deref()
                    .is_none_or(|r| issued.scopes.iter().any(|g| scope_covers(g, r)))
        })
    });
    if valid {
        return None;
    }
    let realm = lock(&shared.settings)
        .token_realm
        .clone()
        .unwrap_or_else(|| format!("{}/token", shared.public_url));
    let mut challenge = format!("Bearer realm=\"{realm}\",service=\"{}\"", auth.service);
    if let Some(scope) = &required {
        challenge.push_str(&format!(",scope=\"{scope}\""));
    }
    let body = serde_json::json!({"errors": [{"code": "UNAUTHORIZED", "message": "authentication required", "detail": null}]});
    Some(simple(
        StatusCode::UNAUTHORIZED,
        &[
            ("www-authenticate", challenge),
            ("content-type", "application/json".to_owned()),
        ],
        Bytes::from(body.to_string()),
    ))
}

fn issue_token(
    shared: &Shared,
    auth: &TokenAuth,
    headers: &HeaderMap,
    query: Option<&str>,
) -> Response<ProxyBody> {
    let scopes: Vec<String> = query_values(query, "scope")
        .iter()
        .flat_map(|s| s.split(' ').map(str::to_owned).collect::<Vec<_>>())
        .filter(|s| !s.is_empty())
        .collect();
    if let Some((user, password)) = &auth.credentials {
        let expected = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
        );
        let presented = headers
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        if presented != Some(expected.as_str()) {
            return simple(
                StatusCode::UNAUTHORIZED,
                &[
                    (
                        "www-authenticate",
                        format!("Basic realm=\"{}\"", auth.service),
                    ),
                    ("content-type", "application/json".to_owned()),
                ],
                Bytes::from_static(br#"{"details":"incorrect username or password"}"#),
            );
        }
    }
    let services = query_values(query, "service");
    if services.iter().any(|s| s != &auth.service) {
        return simple(
            StatusCode::BAD_REQUEST,
            &[("content-type", "application/json".to_owned())],
            Bytes::from_static(br#"{"details":"unknown service"}"#),
        );
    }
    let token = {
        let mut settings = lock(&shared.settings);
        settings.issued += 1;
        let seed = format!(
            "{}-{}-{:?}",
            shared.addr,
            settings.issued,
            SystemTime::now()
        );
        let token = hex::encode(Sha256::digest(seed.as_bytes()));
        settings.tokens.insert(
            token.clone(),
            IssuedToken {
                scopes,
                expires: Instant::now() + Duration::from_secs(auth.expires_in_secs),
            },
        );
        token
    };
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let body = serde_json::json!({
        "token": token,
        "access_token": token,
        "expires_in": auth.expires_in_secs,
        "issued_at": rfc3339_utc(now),
    });
    simple(
        StatusCode::OK,
        &[("content-type", "application/json".to_owned())],
        Bytes::from(body.to_string()),
    )
}

/// Formats Unix seconds as `YYYY-MM-DDTHH:MM:SSZ`. Pure.
#[must_use]
pub fn rfc3339_utc(unix_secs: u64) -> String {
    let days = unix_secs / 86_400;
    let rem = unix_secs % 86_400;
    // Howard Hinnant's civil_from_days, for days since 1970-01-01 (non-negative here).
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    #[test]
    fn paths_are_classified_by_what_they_address() {
        assert_eq!(classify("/v2/"), (Kind::Base, None));
        assert_eq!(classify("/v2/_catalog"), (Kind::Catalog, None));
        assert_eq!(
            classify("/v2/library/alpine/manifests/3.19"),
            (Kind::Manifest, Some("library/alpine".to_owned()))
        );
        assert_eq!(
            classify("/v2/a/b/c/blobs/sha256:00"),
            (Kind::Blob, Some("a/b/c".to_owned()))
        );
        assert_eq!(
            classify("/v2/x/blobs/uploads/123"),
            (Kind::Upload, Some("x".to_owned()))
        );
        assert_eq!(
            classify("/v2/x/tags/list"),
            (Kind::Tags, Some("x".to_owned()))
        );
        assert_eq!(classify("/token"), (Kind::Token, None));
        assert_eq!(classify("/metrics"), (Kind::Other, None));
        assert_eq!(classify("/v2//manifests/x").0, Kind::Other);
    }

    #[test]
    fn a_scope_covers_only_its_own_repository_and_actions() {
        assert!(scope_covers(
            "repository:library/a:pull",
            "repository:library/a:pull"
        ));
        assert!(scope_covers(
            "repository:library/a:pull,push",
            "repository:library/a:push"
        ));
        assert!(!scope_covers(
            "repository:library/a:pull",
            "repository:library/b:pull"
        ));
        assert!(!scope_covers(
            "repository:library/a:pull",
            "repository:library/a:push"
        ));
        assert!(!scope_covers("garbage", "repository:library/a:pull"));
    }

    #[test]
    fn rfc3339_formats_known_instants() {
        assert_eq!(rfc3339_utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339_utc(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339_utc(1_700_000_000), "2023-11-14T22:13:20Z");
    }

    #[test]
    fn a_rule_limited_to_n_times_stops_matching_at_zero() {
        let rule = FaultRule::new(Fault::Reset).kind(Kind::Blob).times(0);
        assert!(!rule.matches(&Method::GET, Kind::Blob, "/v2/x/blobs/y"));
        let rule = FaultRule::new(Fault::Reset)
            .kind(Kind::Blob)
            .method(Method::GET);
        assert!(rule.matches(&Method::GET, Kind::Blob, "/v2/x/blobs/y"));
        assert!(!rule.matches(&Method::HEAD, Kind::Blob, "/v2/x/blobs/y"));
        assert!(!rule.matches(&Method::GET, Kind::Manifest, "/v2/x/manifests/y"));
    }

    #[tokio::test]
    async fn truncation_passes_exactly_the_prefix_then_fails() {
        let chunks: Vec<Result<Bytes, BoxError>> = vec![
            Ok(Bytes::from_static(b"hello")),
            Ok(Bytes::from_static(b"world")),
        ];
        let out: Vec<Result<Bytes, BoxError>> =
            truncate(futures::stream::iter(chunks), 7).collect().await;
        assert_eq!(out.len(), 3);
        assert_eq!(out[0].as_ref().unwrap(), &Bytes::from_static(b"hello"));
        assert_eq!(out[1].as_ref().unwrap(), &Bytes::from_static(b"wo"));
        assert!(out[2].is_err());
    }

    #[tokio::test]
    async fn corruption_flips_one_byte_and_keeps_the_length() {
        let chunks: Vec<Result<Bytes, BoxError>> = vec![
            Ok(Bytes::from_static(b"abc")),
            Ok(Bytes::from_static(b"def")),
        ];
        let out: Vec<u8> = corrupt(futures::stream::iter(chunks), 4)
            .try_collect::<Vec<Bytes>>()
            .await
            .unwrap()
            .concat();
        assert_eq!(out.len(), 6);
        assert_eq!(&out[..4], b"abcd");
        assert_eq!(out[4], !b'e');
        assert_eq!(out[5], b'f');
    }
}
