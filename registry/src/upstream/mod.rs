//! Upstream registries: one [`Upstream`] per configured registry name, each with its own HTTP
//! client settings, credentials, bearer-token cache, circuit breaker and pull-budget record.
//!
//! Invariants: only configured registries exist here (the `ns` allowlist is this map), so no
//! request can make the proxy contact an arbitrary host; the one host an upstream can name is its
//! token realm, and credentials go there only when [`token::check_realm`] allows it. Retries
//! happen only for idempotent requests that got no HTTP answer at all; an HTTP error, and above
//! all a 429, is never retried. One token request per (realm, service, scope, credentials) is in
//! flight at a time, shared by every request that needs it; a failing token service counts
//! against the upstream's circuit like the registry itself.
//!
//! The budget record keeps when each figure was observed; a figure older than its window is no
//! budget at all ([`Upstream::budget`] is `None`), and [`Upstream::refresh_expired_budget`] lets a
//! caller spend one free HEAD (at most one a minute) to learn the current one.

pub mod auth;
pub mod circuit;
pub mod peers;
pub mod ratelimit;
pub mod token;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::{header, HeaderValue, Method, StatusCode};
use rand::Rng as _;

use crate::config::{Config, UpstreamTuning};
use crate::oci::{media, Digest, Reference, RepositoryName};
use crate::proxy::flight::{FlightError, SingleFlight};
use crate::telemetry::{Budget, RateLimited, Telemetry};
use auth::{BasicCredentials, Challenge, CredentialFiles, TokenCache};
use circuit::{Admission, Circuit};
use token::{FetchTokenError, TokenRequest};

/// Why the set of upstreams could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BuildUpstreamError {
    #[error("registries.{registry}.credentials: {source}")]
    Credentials {
        registry: String,
        source: auth::LoadCredentialsError,
    },
    #[error("cannot read CA file {path}: {source}")]
    CaFile {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("CA file {path} holds no usable PEM certificate: {source}")]
    CaParse {
        path: std::path::PathBuf,
        source: reqwest::Error,
    },
    #[error("parent: client certificate {cert} / key {key}: {message}")]
    ClientIdentity {
        cert: std::path::PathBuf,
        key: std::path::PathBuf,
        message: String,
    },
    #[error("parent.bearerTokenFile: {0}")]
    ParentToken(#[from] crate::token_file::LoadTokenError),
    #[error("cluster.self: `{url}` cannot be sent as a header")]
    PeerUrl { url: String },
    #[error("parent.spokeId: `{id}` cannot be sent as a header")]
    SpokeId { id: String },
    #[error("cannot build the HTTP client for {registry}: {source}")]
    Client {
        registry: String,
        source: reqwest::Error,
    },
}

/// A failed upstream request. Cloneable: one failure is shared by every coalesced waiter.
#[derive(Debug, Clone, thiserror::Error)]
pub enum UpstreamError {
    #[error("upstream {registry} answered {}: {message}", status.as_u16())]
    Status {
        registry: String,
        status: StatusCode,
        message: String,
        retry_after: Option<String>,
    },
    #[error("cannot reach upstream {registry}: {message}")]
    Connect { registry: String, message: String },
    #[error("upstream {registry} did not answer within {}s", timeout.as_secs_f32())]
    Timeout { registry: String, timeout: Duration },
    #[error("upstream {registry} keeps failing; not asking it again for {}s (circuit open)", retry_in.as_secs())]
    CircuitOpen {
        registry: String,
        retry_in: Duration,
    },
    #[error("upstream {registry} rate-limited us; waiting {}s as its Retry-After asked", retry_in.as_secs())]
    RateLimitedLocally {
        registry: String,
        retry_in: Duration,
    },
    #[error("cannot get a token for upstream {registry} from {realm}: {source}")]
    Token {
        registry: String,
        /// The realm's host (or the realm as given, when it is not a URL).
        realm: String,
        source: FetchTokenError,
    },
    #[error("internal error talking to upstream: {message}")]
    Aborted { message: String },
}

impl FlightError for UpstreamError {
    fn task_failed(message: String) -> Self {
        UpstreamError::Aborted { message }
    }
}

impl UpstreamError {
    /// Whether a peer that failed this way should be skipped for the real upstream: it did not
    /// answer, or failed internally. A 404, a 429 or a 502/504 (the peer's own upstream failing)
    /// is an answer, and asking the upstream again would only spend more of its budget.
    pub fn peer_unusable(&self) -> bool {
        match self {
            UpstreamError::Status { status, .. } => {
                *status == StatusCode::INTERNAL_SERVER_ERROR
                    || *status == StatusCode::SERVICE_UNAVAILABLE
            }
            UpstreamError::Connect { .. }
            | UpstreamError::Timeout { .. }
            | UpstreamError::CircuitOpen { .. }
            | UpstreamError::Aborted { .. } => true,
            UpstreamError::RateLimitedLocally { .. } | UpstreamError::Token { .. } => false,
        }
    }

    /// Whether a cached copy should be served instead (stale-if-error): the upstream is down,
    /// slow, failing or rate-limiting, as opposed to answering that the content does not exist.
    pub fn allows_stale(&self) -> bool {
        match self {
            UpstreamError::Status { status, .. } => {
                status.is_server_error() || *status == StatusCode::TOO_MANY_REQUESTS
            }
            // The token service failing is the upstream failing; only a refusal of the
            // credentials is an answer.
            UpstreamError::Token { source, .. } => !source.is_denial(),
            _ => true,
        }
    }
}

/// What an upstream request is for.
#[derive(Debug, Clone, Copy)]
pub enum Target<'a> {
    Manifest(&'a Reference),
    Blob(&'a Digest),
    /// `tags/list` with the client's `n` and `last`.
    Tags {
        n: Option<&'a str>,
        last: Option<&'a str>,
    },
}

/// One upstream registry.
#[derive(Debug)]
pub struct Upstream {
    name: String,
    base: String,
    /// `Some(registry)` when requests go through a parent cachalot, which needs `?ns=`.
    ns: Option<String>,
    client: reqwest::Client,
    credentials: CredentialFiles,
    tokens: Arc<TokenCache>,
    prefers_basic: std::sync::atomic::AtomicBool,
    circuit: Arc<Circuit>,
    /// Hosts besides the upstream's own that may see credentials as token realms (lower case).
    token_hosts: Vec<String>,
    token_flights: SingleFlight<TokenKey, (String, Duration), UpstreamError>,
    /// The realm and service of the last Bearer challenge: requests without a token for their
    /// scope fetch one before they are sent, instead of each collecting a 401 first.
    bearer: Mutex<Option<(String, Option<String>)>>,
    tuning: UpstreamTuning,
    telemetry: Arc<Telemetry>,
    budget: Mutex<Option<Budget>>,
    /// Unix seconds of the last budget refresh started (0: never).
    budget_refreshed_at: std::sync::atomic::AtomicU64,
    /// Set when this "upstream" is another replica of the mirror (see [`peers`]).
    peer: Option<PeerRole>,
    /// Set when this upstream is the parent mirror (a hub): the spoke id sent with every
    /// request (see [`crate::fleet`]).
    parent_spoke: Option<HeaderValue>,
    /// The token sent to the parent (`parent.bearerTokenFile`): every request carries it and
    /// no challenge is followed.
    parent_token: Option<Arc<crate::token_file::TokenFile>>,
    /// Set when this upstream is the parent mirror: where the purge log position its answers
    /// announce goes (see [`crate::purge_sync`]).
    purge_signal: Option<Arc<crate::purge_sync::PurgeSignal>>,
}

/// The header a replica sends with a request it forwards to the owner replica; a request
/// carrying it is never forwarded again (no loops).
pub const FORWARDED_BY: &str = "x-cachalot-forwarded-by";

/// The header with which a replica tells a peer when the tag it answers for was last confirmed
/// upstream (unix seconds).
pub const CHECKED_AT: &str = "x-cachalot-checked-at";

/// What makes an [`Upstream`] a peer: who is asking, and the real upstream to use instead when
/// the peer cannot answer.
#[derive(Debug)]
struct PeerRole {
    forwarded_by: HeaderValue,
    fallback: Arc<Upstream>,
}

/// What makes two token requests the same: one is in flight at a time per key.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct TokenKey {
    realm: String,
    service: Option<String>,
    scope: String,
    /// A hash of the credentials (never the credentials themselves), so a rotation mid-flight
    /// does not hand out a token issued for the old ones.
    credentials: Option<u64>,
}

fn credentials_fingerprint(credentials: Option<&BasicCredentials>) -> Option<u64> {
    use std::hash::{Hash as _, Hasher as _};
    credentials.map(|c| {
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        (&c.username, &c.password).hash(&mut hasher);
        hasher.finish()
    })
}

fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::HEAD => "HEAD",
        _ => "GET",
    }
}

/// A client certificate and key (PEM files) presented in the TLS handshake.
#[derive(Debug, Clone, Copy)]
struct ClientIdentity<'a> {
    cert: &'a std::path::Path,
    key: &'a std::path::Path,
}

fn load_identity(files: ClientIdentity<'_>) -> Result<reqwest::Identity, BuildUpstreamError> {
    let error = |message: String| BuildUpstreamError::ClientIdentity {
        cert: files.cert.to_owned(),
        key: files.key.to_owned(),
        message,
    };
    let mut pem = std::fs::read(files.key).map_err(|e| error(e.to_string()))?;
    pem.push(b'\n');
    pem.extend(std::fs::read(files.cert).map_err(|e| error(e.to_string()))?);
    reqwest::Identity::from_pem(&pem).map_err(|e| error(error_chain(&e)))
}

fn client_for(
    registry: &str,
    tuning: &UpstreamTuning,
    ca_file: Option<&std::path::Path>,
    insecure: bool,
    identity: Option<ClientIdentity<'_>>,
) -> Result<reqwest::Client, BuildUpstreamError> {
    let mut builder = reqwest::Client::builder()
        .connect_timeout(tuning.connect_timeout)
        .pool_idle_timeout(Duration::from_secs(60))
        .user_agent(concat!("cachalot-registry/", env!("CARGO_PKG_VERSION")));
    if let Some(path) = ca_file {
        let pem = std::fs::read(path).map_err(|source| BuildUpstreamError::CaFile {
            path: path.to_owned(),
            source,
        })?;
        let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|source| {
            BuildUpstreamError::CaParse {
                path: path.to_owned(),
                source,
            }
        })?;
        builder = builder.tls_certs_merge(certs);
    }
    if insecure {
        builder = builder.tls_danger_accept_invalid_certs(true);
    }
    if let Some(files) = identity {
        builder = builder.identity(load_identity(files)?);
    }
    builder
        .build()
        .map_err(|source| BuildUpstreamError::Client {
            registry: registry.to_owned(),
            source,
        })
}

/// Reads at most `limit` bytes of an error body and extracts the OCI error message, if any.
async fn error_message(response: reqwest::Response, limit: usize) -> String {
    let status = response.status();
    let mut body = Vec::new();
    let mut response = response;
    while body.len() < limit {
        match tokio::time::timeout(Duration::from_secs(5), response.chunk()).await {
            Ok(Ok(Some(chunk))) => body.extend_from_slice(&chunk),
            _ => break,
        }
    }
    body.truncate(limit);
    serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| {
            let e = v.get("errors")?.get(0)?;
            let code = e.get("code").and_then(|c| c.as_str()).unwrap_or("");
            let message = e.get("message").and_then(|m| m.as_str()).unwrap_or("");
            Some(format!("{code} {message}").trim().to_owned())
        })
        .filter(|m| !m.is_empty())
        .unwrap_or_else(|| status.canonical_reason().unwrap_or("error").to_owned())
}

impl Upstream {
    /// The credentials as their files say now; tokens issued for older ones are forgotten.
    fn current_credentials(&self) -> Option<BasicCredentials> {
        let (credentials, changed) = self.credentials.current();
        if changed {
            self.tokens.clear();
        }
        credentials
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The last budget reported by the upstream, unless it is older than its window (then the
    /// budget is unknown, not low).
    pub fn budget(&self) -> Option<Budget> {
        let now = crate::store::now_secs();
        self.budget
            .lock()
            .ok()
            .and_then(|b| b.clone())
            .filter(|b| !b.expired_at(now))
    }

    /// When the last figure has expired, sends one HEAD for `reference` in the background (free
    /// of the pull limit) so its `ratelimit-*` headers renew the figure; at most one such HEAD a
    /// minute (see [`ratelimit::refresh_due`]). Returns whether it sent one.
    pub fn refresh_expired_budget(
        self: &Arc<Self>,
        repo: &RepositoryName,
        reference: &Reference,
    ) -> bool {
        use std::sync::atomic::Ordering;
        let now = crate::store::now_secs();
        let last = self.budget_refreshed_at.load(Ordering::Relaxed);
        let figure = self.budget.lock().ok().and_then(|b| b.clone());
        if !ratelimit::refresh_due(figure.as_ref(), last, now) {
            return false;
        }
        // Claim the slot: of concurrent callers, one sends the HEAD.
        if self
            .budget_refreshed_at
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_err()
        {
            return false;
        }
        let (upstream, repo, reference) = (Arc::clone(self), repo.clone(), reference.clone());
        tokio::spawn(async move {
            let outcome = upstream
                .send(Method::HEAD, &repo, Target::Manifest(&reference))
                .await;
            match outcome {
                Ok(_) => {
                    tracing::debug!(registry = upstream.name(), "budget refreshed with a HEAD")
                }
                Err(e) => {
                    tracing::info!(registry = upstream.name(), error = %e, "budget refresh HEAD failed")
                }
            }
        });
        true
    }

    fn url(&self, repo: &RepositoryName, target: Target<'_>) -> String {
        let mut url = match target {
            Target::Manifest(reference) => format!("{}/v2/{repo}/manifests/{reference}", self.base),
            Target::Blob(digest) => format!("{}/v2/{repo}/blobs/{digest}", self.base),
            Target::Tags { .. } => format!("{}/v2/{repo}/tags/list", self.base),
        };
        let mut query = form_urlencoded::Serializer::new(String::new());
        if let Some(ns) = &self.ns {
            query.append_pair("ns", ns);
        }
        if let Target::Tags { n, last } = target {
            if let Some(n) = n {
                query.append_pair("n", n);
            }
            if let Some(last) = last {
                query.append_pair("last", last);
            }
        }
        let query = query.finish();
        if !query.is_empty() {
            url.push('?');
            url.push_str(&query);
        }
        url
    }

    /// Whether this is another replica of the mirror rather than a registry.
    pub fn is_peer(&self) -> bool {
        self.peer.is_some()
    }

    /// Whether `response` came from the parent mirror (directly, or as a peer's fallback), whose
    /// tag answers carry their `Age`.
    pub fn answered_by_parent(&self, response: &reqwest::Response) -> bool {
        match &self.peer {
            Some(peer) => !self.answered_by_peer(response) && peer.fallback.parent_spoke.is_some(),
            None => self.parent_spoke.is_some(),
        }
    }

    /// The real upstream a peer falls back to (`None` for a real upstream).
    pub fn fallback(&self) -> Option<&Arc<Upstream>> {
        self.peer.as_ref().map(|p| &p.fallback)
    }

    /// Whether requests are failing fast right now (the circuit is open).
    pub fn is_down(&self) -> bool {
        self.circuit.is_open(Instant::now())
    }

    /// Sends a request and returns the successful (2xx) response; anything else is an error.
    /// A peer that cannot answer (unreachable, too slow, its circuit open, or failing itself
    /// with a 500 or 503) is skipped: the request goes to the real upstream instead, once.
    pub async fn send(
        &self,
        method: Method,
        repo: &RepositoryName,
        target: Target<'_>,
    ) -> Result<reqwest::Response, UpstreamError> {
        let result = self.send_here(method.clone(), repo, target).await;
        match (&self.peer, result) {
            (Some(peer), Err(e)) if e.peer_unusable() => {
                tracing::info!(peer = %self.base, registry = %self.name, error = %e, "peer unusable; asking the upstream directly");
                Box::pin(peer.fallback.send(method, repo, target)).await
            }
            (_, result) => result,
        }
    }

    /// A peer answered with something no cachalot sends (no or the wrong digest, bytes that do
    /// not verify): it is treated as down (its circuit opens) and `None` is returned for a real
    /// upstream, else the fallback to use instead.
    pub fn peer_answered_garbage(&self, what: &str) -> Option<&Arc<Upstream>> {
        let peer = self.peer.as_ref()?;
        tracing::warn!(peer = %self.base, registry = %self.name, what, "peer answered garbage; treating it as down");
        self.circuit.failure(Instant::now());
        Some(&peer.fallback)
    }

    /// Whether `response` came from this replica's peer (not from its fallback upstream).
    pub fn answered_by_peer(&self, response: &reqwest::Response) -> bool {
        self.peer.is_some() && response.url().as_str().starts_with(&self.base)
    }

    async fn send_here(
        &self,
        method: Method,
        repo: &RepositoryName,
        target: Target<'_>,
    ) -> Result<reqwest::Response, UpstreamError> {
        let url = self.url(repo, target);
        if let Some(token) = &self.parent_token {
            // The parent takes its one token; its 401 is an answer, not a challenge to follow.
            let response = self
                .send_with_retries(&method, &url, Some(&token.current()), target)
                .await?;
            return self.check_status(response).await;
        }
        let scope = format!("repository:{repo}:pull");
        let mut bearer = self.tokens.get(&scope, Instant::now());
        if bearer.is_none() {
            let known = self.bearer.lock().ok().and_then(|b| b.clone());
            if let Some((realm, service)) = known {
                bearer = Some(
                    self.token(&realm, service.as_deref(), &scope, &scope)
                        .await?,
                );
            }
        }
        let mut authenticated_once = false;
        loop {
            let response = self
                .send_with_retries(&method, &url, bearer.as_deref(), target)
                .await?;
            if response.status() == StatusCode::UNAUTHORIZED && !authenticated_once {
                let challenge = response
                    .headers()
                    .get(header::WWW_AUTHENTICATE)
                    .and_then(|v| v.to_str().ok())
                    .and_then(auth::parse_challenge);
                match challenge {
                    Some(Challenge::Bearer {
                        realm,
                        service,
                        scope: challenge_scope,
                    }) => {
                        authenticated_once = true;
                        if let Ok(mut known) = self.bearer.lock() {
                            *known = Some((realm.clone(), service.clone()));
                        }
                        // Another request may have fetched this scope's token meanwhile.
                        let cached = self.tokens.get(&scope, Instant::now());
                        if cached.is_some() && cached != bearer {
                            bearer = cached;
                            continue;
                        }
                        let wanted = challenge_scope.unwrap_or_else(|| scope.clone());
                        bearer = Some(
                            self.token(&realm, service.as_deref(), &wanted, &scope)
                                .await?,
                        );
                        continue;
                    }
                    Some(Challenge::Basic) if self.credentials.configured() => {
                        self.prefers_basic
                            .store(true, std::sync::atomic::Ordering::Relaxed);
                        authenticated_once = true;
                        continue;
                    }
                    _ => {}
                }
            }
            return self.check_status(response).await;
        }
    }

    async fn check_status(
        &self,
        response: reqwest::Response,
    ) -> Result<reqwest::Response, UpstreamError> {
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        let retry_after = response
            .headers()
            .get(header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let message = error_message(response, 16 * 1024).await;
        Err(UpstreamError::Status {
            registry: self.name.clone(),
            status,
            message,
            retry_after,
        })
    }

    async fn send_with_retries(
        &self,
        method: &Method,
        url: &str,
        bearer: Option<&str>,
        target: Target<'_>,
    ) -> Result<reqwest::Response, UpstreamError> {
        let label = method_label(method);
        let mut attempt = 0u32;
        loop {
            match self.circuit.admit(Instant::now()) {
                Admission::Allow | Admission::Probe => {}
                Admission::Open(retry_in) => {
                    return Err(UpstreamError::CircuitOpen {
                        registry: self.name.clone(),
                        retry_in,
                    })
                }
                Admission::RateLimited(retry_in) => {
                    return Err(UpstreamError::RateLimitedLocally {
                        registry: self.name.clone(),
                        retry_in,
                    })
                }
            }
            let mut request = self.client.request(method.clone(), url);
            if let Some(peer) = &self.peer {
                request = request.header(FORWARDED_BY, peer.forwarded_by.clone());
            }
            if let Some(spoke) = &self.parent_spoke {
                request = request.header(crate::fleet::SPOKE_HEADER, spoke.clone());
            }
            if matches!(target, Target::Manifest(_)) {
                request = request.header(header::ACCEPT, media::MANIFEST_ACCEPT);
            }
            if let Some(token) = bearer {
                request = request.bearer_auth(token);
            } else if let Some(c) = self.current_credentials() {
                if self
                    .prefers_basic
                    .load(std::sync::atomic::Ordering::Relaxed)
                {
                    request = request.basic_auth(&c.username, Some(&c.password));
                }
            }
            let sent = tokio::time::timeout(self.tuning.response_timeout, request.send()).await;
            let error = match sent {
                Ok(Ok(response)) => {
                    let status = response.status();
                    self.telemetry
                        .record_upstream(&self.name, label, status.as_str());
                    if let Some(signal) = &self.purge_signal {
                        signal.observe(response.headers());
                    }
                    if matches!(target, Target::Manifest(_)) {
                        self.note_budget(response.headers());
                    }
                    if status.is_server_error() {
                        self.note_failure();
                    } else if status == StatusCode::TOO_MANY_REQUESTS {
                        let retry_after = ratelimit::retry_after_secs(response.headers());
                        // Both of Docker Hub's 429s: the pull limit (with `ratelimit-*`
                        // headers, recorded above) and the abuse limit (a bare 429).
                        self.telemetry.record_rate_limited(
                            &self.name,
                            RateLimited::new(crate::store::now_secs(), retry_after),
                        );
                        let wait = retry_after.map(Duration::from_secs);
                        self.circuit.rate_limited(Instant::now(), wait);
                    } else {
                        self.circuit.success();
                        self.telemetry.record_circuit(&self.name, false);
                    }
                    return Ok(response);
                }
                Ok(Err(e)) => {
                    self.telemetry.record_upstream(&self.name, label, "error");
                    self.note_failure();
                    if e.is_timeout() {
                        UpstreamError::Timeout {
                            registry: self.name.clone(),
                            timeout: self.tuning.connect_timeout,
                        }
                    } else {
                        UpstreamError::Connect {
                            registry: self.name.clone(),
                            message: error_chain(&e),
                        }
                    }
                }
                Err(_) => {
                    self.telemetry.record_upstream(&self.name, label, "timeout");
                    self.note_failure();
                    UpstreamError::Timeout {
                        registry: self.name.clone(),
                        timeout: self.tuning.response_timeout,
                    }
                }
            };
            let retryable = matches!(error, UpstreamError::Connect { .. });
            if !retryable || attempt >= self.tuning.retries {
                return Err(error);
            }
            attempt += 1;
            // Jittered exponential backoff, bounded: 50–100 ms, 100–200 ms, ...
            let base = 50u64.saturating_mul(1 << attempt.min(5));
            let jitter = rand::rng().random_range(0..=base);
            tokio::time::sleep(Duration::from_millis(base / 2 + jitter / 2)).await;
        }
    }

    /// GETs `path_and_query` (`/v2/_cachalot/...`) from the parent mirror with this spoke's id,
    /// client certificate and token, bounded by the response timeout; the body, at most `limit`
    /// bytes. Not counted as an upstream request and outside the circuit: it is no pull.
    pub async fn get_from_parent(
        &self,
        path_and_query: &str,
        limit: usize,
    ) -> Result<bytes::Bytes, UpstreamError> {
        let url = format!("{}{path_and_query}", self.base.trim_end_matches('/'));
        let mut request = self.client.get(&url).timeout(self.tuning.response_timeout);
        if let Some(spoke) = &self.parent_spoke {
            request = request.header(crate::fleet::SPOKE_HEADER, spoke.clone());
        }
        if let Some(token) = &self.parent_token {
            request = request.bearer_auth(token.current());
        }
        let response = request.send().await.map_err(|e| {
            if e.is_timeout() {
                UpstreamError::Timeout {
                    registry: self.name.clone(),
                    timeout: self.tuning.response_timeout,
                }
            } else {
                UpstreamError::Connect {
                    registry: self.name.clone(),
                    message: error_chain(&e),
                }
            }
        })?;
        let response = self.check_status(response).await?;
        let too_large = || UpstreamError::Aborted {
            message: format!("{url}: answer larger than {limit} bytes"),
        };
        let mut response = response;
        let mut body = Vec::new();
        loop {
            match tokio::time::timeout(self.tuning.body_idle_timeout, response.chunk()).await {
                Ok(Ok(Some(chunk))) => {
                    if body.len() + chunk.len() > limit {
                        return Err(too_large());
                    }
                    body.extend_from_slice(&chunk);
                }
                Ok(Ok(None)) => return Ok(bytes::Bytes::from(body)),
                Ok(Err(e)) => {
                    return Err(UpstreamError::Connect {
                        registry: self.name.clone(),
                        message: error_chain(&e),
                    })
                }
                Err(_) => {
                    return Err(UpstreamError::Timeout {
                        registry: self.name.clone(),
                        timeout: self.tuning.body_idle_timeout,
                    })
                }
            }
        }
    }

    fn note_failure(&self) {
        if self.circuit.failure(Instant::now()) {
            self.telemetry.record_circuit(&self.name, true);
        }
    }

    fn note_budget(&self, headers: &http::HeaderMap) {
        let now = crate::store::now_secs();
        if let Some(mut budget) = ratelimit::budget_from_headers(headers, now) {
            // A hub (or the owner replica) relays the figure it observed earlier: date it then.
            if self.parent_spoke.is_some() || self.peer.is_some() {
                if let Some(age) = ratelimit::numeric_header(headers, crate::fleet::BUDGET_AGE) {
                    budget.observed_at = crate::fleet::dated_back(now, age);
                }
            }
            self.telemetry.record_budget(&self.name, &budget);
            if let Ok(mut b) = self.budget.lock() {
                *b = Some(budget);
            }
        }
    }

    /// A token for `scope` from `realm`, cached under `cache_scope` (the request's own scope,
    /// which a challenge may name differently): one request per (realm, service, scope,
    /// credentials) at a time, whoever asks; the realm is checked before credentials go
    /// anywhere. The flight caches the token before it ends, so a request that meets a 401 just
    /// after finds it instead of asking again; each waiter caches it under its own scope too.
    async fn token(
        &self,
        realm: &str,
        service: Option<&str>,
        scope: &str,
        cache_scope: &str,
    ) -> Result<String, UpstreamError> {
        let mut url = reqwest::Url::parse(realm).map_err(|e| UpstreamError::Token {
            registry: self.name.clone(),
            realm: realm.chars().take(128).collect(),
            source: FetchTokenError::Invalid {
                message: format!("the token realm is not a URL: {e}"),
            },
        })?;
        let realm_host = url.host_str().unwrap_or("").to_owned();
        let token_error = |source| UpstreamError::Token {
            registry: self.name.clone(),
            realm: realm_host.clone(),
            source,
        };
        let credentials = self.current_credentials();
        let registry_url = reqwest::Url::parse(&self.base).map_err(|e| {
            token_error(FetchTokenError::Invalid {
                message: format!("the registry URL {} is not a URL: {e}", self.base),
            })
        })?;
        token::check_realm(
            &self.name,
            &url,
            &registry_url,
            &self.token_hosts,
            credentials.is_some(),
        )
        .map_err(token_error)?;
        url.query_pairs_mut().append_pair("scope", scope);
        if let Some(service) = service {
            url.query_pairs_mut().append_pair("service", service);
        }
        let key = TokenKey {
            realm: realm.to_owned(),
            service: service.map(str::to_owned),
            scope: scope.to_owned(),
            credentials: credentials_fingerprint(credentials.as_ref()),
        };
        let request = TokenRequest {
            client: self.client.clone(),
            url,
            credentials,
            timeout: self.tuning.response_timeout,
        };
        let (name, telemetry, circuit, tokens) = (
            self.name.clone(),
            Arc::clone(&self.telemetry),
            Arc::clone(&self.circuit),
            Arc::clone(&self.tokens),
        );
        let flight_scope = cache_scope.to_owned();
        let (result, leader) = self
            .token_flights
            .run(key, move || async move {
                let result = token::request_token(request).await;
                if let Ok((token, lifetime)) = &result {
                    tokens.put(&flight_scope, token.clone(), *lifetime, Instant::now());
                }
                if let Some(label) = token::status_label(&result) {
                    telemetry.record_upstream(&name, "token", &label);
                }
                if let Err(source) = &result {
                    if source.is_outage() && circuit.failure(Instant::now()) {
                        telemetry.record_circuit(&name, true);
                    }
                    if let Some(wait) = source.retry_after() {
                        circuit.rate_limited(Instant::now(), Some(wait));
                    }
                    if source.is_rate_limit() {
                        // Reported like the registry's own 429s (`rateLimited` in /stats).
                        let retry_after = source.retry_after().map(|wait| wait.as_secs());
                        telemetry.record_rate_limited(
                            &name,
                            RateLimited::new(crate::store::now_secs(), retry_after),
                        );
                    }
                }
                result.map_err(|source| UpstreamError::Token {
                    registry: name,
                    realm: realm_host,
                    source,
                })
            })
            .await;
        let (token, lifetime) = result?;
        if !leader {
            // A waiter that joined someone else's flight may ask for another scope.
            self.tokens
                .put(cache_scope, token.clone(), lifetime, Instant::now());
        }
        Ok(token)
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut message = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        message.push_str(": ");
        message.push_str(&s.to_string());
        source = s.source();
    }
    message
}

/// All configured upstreams, keyed by registry name: the `ns` allowlist.
#[derive(Debug)]
pub struct Upstreams {
    by_name: BTreeMap<String, Arc<Upstream>>,
}

impl Upstreams {
    pub fn new(
        config: &Config,
        telemetry: Arc<Telemetry>,
    ) -> Result<Upstreams, BuildUpstreamError> {
        // Installing the process-wide TLS provider twice is harmless; the first one stays.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut by_name = BTreeMap::new();
        let parent_spoke = match &config.parent {
            Some(parent) => {
                let id = parent
                    .spoke_id
                    .clone()
                    .unwrap_or_else(crate::fleet::default_spoke_id);
                Some(header_value(&id).ok_or(BuildUpstreamError::SpokeId { id: id.clone() })?)
            }
            None => None,
        };
        let parent_token = (config.parent.as_ref())
            .and_then(|p| p.bearer_token_file.as_deref())
            .map(|path| crate::token_file::TokenFile::load(path).map(Arc::new))
            .transpose()?;
        let purge_signal = config
            .parent
            .as_ref()
            .map(|_| Arc::new(crate::purge_sync::PurgeSignal::default()));
        let identity = config.parent.as_ref().and_then(|p| {
            Some(ClientIdentity {
                cert: p.client_cert_file.as_deref()?,
                key: p.client_key_file.as_deref()?,
            })
        });
        for (name, registry) in &config.registries {
            let (base, ns, ca, insecure) = match &config.parent {
                Some(parent) => (
                    parent.url.clone(),
                    Some(name.clone()),
                    parent.ca_file.as_deref(),
                    parent.insecure_skip_verify,
                ),
                None => (
                    registry
                        .url
                        .clone()
                        .unwrap_or_else(|| crate::config::default_url(name)),
                    None,
                    registry.ca_file.as_deref(),
                    registry.insecure_skip_verify,
                ),
            };
            let credentials =
                CredentialFiles::load(registry.credentials.as_ref(), name).map_err(|source| {
                    BuildUpstreamError::Credentials {
                        registry: name.clone(),
                        source,
                    }
                })?;
            let client = client_for(name, &config.upstream, ca, insecure, identity)?;
            by_name.insert(
                name.clone(),
                Arc::new(Upstream {
                    name: name.clone(),
                    base,
                    ns,
                    client,
                    credentials,
                    tokens: Arc::default(),
                    prefers_basic: std::sync::atomic::AtomicBool::new(false),
                    circuit: Arc::new(Circuit::new(
                        config.upstream.circuit_failure_threshold,
                        config.upstream.circuit_open_for,
                    )),
                    token_hosts: token::builtin_token_hosts(name)
                        .iter()
                        .map(|h| (*h).to_owned())
                        .chain(registry.token_hosts.iter().map(|h| h.to_ascii_lowercase()))
                        .collect(),
                    token_flights: SingleFlight::default(),
                    bearer: Mutex::new(None),
                    tuning: config.upstream.clone(),
                    telemetry: Arc::clone(&telemetry),
                    budget: Mutex::new(None),
                    budget_refreshed_at: std::sync::atomic::AtomicU64::new(0),
                    peer: None,
                    parent_spoke: parent_spoke.clone(),
                    parent_token: parent_token.clone(),
                    purge_signal: purge_signal.clone(),
                }),
            );
        }
        Ok(Upstreams { by_name })
    }

    /// `registry` as served by the replica at `url`, falling back to the real upstream.
    pub fn peer(
        &self,
        registry: &str,
        url: &str,
        self_url: &str,
        tuning: &UpstreamTuning,
        peer_timeout: Duration,
        telemetry: Arc<Telemetry>,
    ) -> Result<Option<Upstream>, BuildUpstreamError> {
        let Some(fallback) = self.get(registry) else {
            return Ok(None);
        };
        let forwarded_by = header_value(self_url).ok_or_else(|| BuildUpstreamError::PeerUrl {
            url: self_url.to_owned(),
        })?;
        let tuning = UpstreamTuning {
            connect_timeout: peer_timeout,
            // The owner answers with headers once its own upstream did.
            response_timeout: tuning.response_timeout + peer_timeout,
            retries: 0,
            circuit_failure_threshold: 1,
            ..tuning.clone()
        };
        let client = client_for(registry, &tuning, None, false, None)?;
        Ok(Some(Upstream {
            name: registry.to_owned(),
            base: url.to_owned(),
            ns: Some(registry.to_owned()),
            client,
            credentials: CredentialFiles::load(None, registry).map_err(|source| {
                BuildUpstreamError::Credentials {
                    registry: registry.to_owned(),
                    source,
                }
            })?,
            tokens: Arc::default(),
            prefers_basic: std::sync::atomic::AtomicBool::new(false),
            circuit: Arc::new(Circuit::new(1, tuning.circuit_open_for)),
            token_hosts: Vec::new(),
            token_flights: SingleFlight::default(),
            bearer: Mutex::new(None),
            tuning,
            telemetry,
            budget: Mutex::new(None),
            budget_refreshed_at: std::sync::atomic::AtomicU64::new(0),
            peer: Some(PeerRole {
                forwarded_by,
                fallback: Arc::clone(fallback),
            }),
            parent_spoke: None,
            parent_token: None,
            purge_signal: None,
        }))
    }

    /// With a parent: the signal its answers feed and an upstream to reach it through (every
    /// upstream goes to the same parent with the same credentials).
    pub fn parent_purges(&self) -> Option<(Arc<crate::purge_sync::PurgeSignal>, Arc<Upstream>)> {
        let upstream = self.by_name.values().next()?;
        let signal = upstream.purge_signal.as_ref()?;
        Some((Arc::clone(signal), Arc::clone(upstream)))
    }

    pub fn get(&self, registry: &str) -> Option<&Arc<Upstream>> {
        self.by_name.get(registry)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.by_name.keys().map(String::as_str)
    }
}

/// `Content-Type` of a response, as the upstream sent it.
pub fn content_type(response: &reqwest::Response) -> Option<String> {
    response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

/// The `Content-Length` header of a response. Unlike `reqwest::Response::content_length`, this
/// is right for HEAD responses too (whose body, and so its size hint, is empty).
pub fn declared_length(response: &reqwest::Response) -> Option<u64> {
    ratelimit::numeric_header(response.headers(), header::CONTENT_LENGTH)
}

/// `Docker-Content-Digest` of a response, if present and well-formed.
pub fn content_digest(response: &reqwest::Response) -> Option<Digest> {
    response
        .headers()
        .get("docker-content-digest")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}

/// A header value that can be copied onto a client response.
pub fn header_value(s: &str) -> Option<HeaderValue> {
    HeaderValue::from_str(s).ok()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use futures::FutureExt as _;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A token service on 127.0.0.1 that counts the tokens it issues.
    async fn token_service() -> (String, Arc<AtomicUsize>) {
        let issued = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&issued);
        let app = axum::Router::new().route(
            "/token",
            axum::routing::get(move || {
                let counter = Arc::clone(&counter);
                async move {
                    counter.fetch_add(1, Ordering::SeqCst);
                    axum::Json(serde_json::json!({"token": "t1", "expires_in": 300}))
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        (format!("http://{addr}/token"), issued)
    }

    #[tokio::test]
    async fn a_token_flight_caches_its_token_before_it_ends_under_every_waiters_scope() {
        let (realm, issued) = token_service().await;
        let mut config = Config::default();
        config
            .registries
            .insert("r.example".into(), crate::config::RegistryConfig::default());
        let telemetry = Arc::new(Telemetry::new(["r.example"]));
        let upstreams = Upstreams::new(&config, telemetry).unwrap();
        let upstream = upstreams.get("r.example").unwrap();
        let (a, b) = ("repository:a:pull", "repository:b:pull");
        // The first caller starts the flight (its first poll) and goes away; the second joins
        // that flight (this runtime has one thread, so the token service has not answered yet)
        // for another request scope, as when a challenge names the scope.
        assert!(upstream
            .token(&realm, None, "challenged", a)
            .now_or_never()
            .is_none());
        assert_eq!(upstream.token_flights.len(), 1);
        let token = upstream.token(&realm, None, "challenged", b).await.unwrap();
        assert_eq!(token, "t1");
        assert_eq!(issued.load(Ordering::SeqCst), 1);
        assert!(upstream.token_flights.is_empty());
        // The flight cached the token for the caller that left; the waiter cached its own.
        let now = Instant::now();
        assert_eq!(upstream.tokens.get(a, now).as_deref(), Some("t1"));
        assert_eq!(upstream.tokens.get(b, now).as_deref(), Some("t1"));
    }
}
