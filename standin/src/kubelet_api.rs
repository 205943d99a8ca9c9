//! The kubelet API subset the API server uses, over HTTPS with a self-signed certificate:
//! `GET /containerLogs/<namespace>/<pod>/<container>` (`tailLines`, `limitBytes`, `follow`,
//! `previous`; `timestamps` is ignored) and `GET /healthz`. That makes `kubectl logs` work.
//! `exec`, `attach`, `portForward`, `/stats` and `/metrics` are not served (404).
//!
//! Invariants: client certificates are not requested (the fixture's API server has no kubelet
//! client certificate and does not verify ours); a TLS handshake has a deadline; a follow streams
//! until the container run ends, the client goes, or [`MAX_FOLLOW`] passes; reads are chunked
//! ([`CHUNK`]), never the whole log at once beyond `tailLines`' window.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use crate::pods::NodeRuntime;

/// Longest follow stream.
pub const MAX_FOLLOW: Duration = Duration::from_secs(3600);
/// Read size of log streaming.
pub const CHUNK: usize = 64 * 1024;
/// Poll period of a follow.
const FOLLOW_POLL: Duration = Duration::from_millis(250);
/// Deadline of a TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

type Body = BoxBody<Bytes, std::io::Error>;

/// A parsed `/containerLogs` request.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LogRequest {
    /// Namespace.
    pub namespace: String,
    /// Pod name.
    pub pod: String,
    /// Container name (may be empty: the pod's only container).
    pub container: Option<String>,
    /// `follow=true`.
    pub follow: bool,
    /// `previous=true`.
    pub previous: bool,
    /// `tailLines=N`.
    pub tail_lines: Option<usize>,
    /// `limitBytes=N`.
    pub limit_bytes: Option<u64>,
}

fn flag(value: &str) -> bool {
    matches!(value, "true" | "1" | "True")
}

/// Parses `/containerLogs/<ns>/<pod>[/<container>]?query` (pure); `None` for other paths.
pub fn parse_log_request(path: &str, query: Option<&str>) -> Option<LogRequest> {
    let rest = path.strip_prefix("/containerLogs/")?;
    let mut parts = rest.split('/').filter(|p| !p.is_empty());
    let mut request = LogRequest {
        namespace: parts.next()?.to_owned(),
        pod: parts.next()?.to_owned(),
        container: parts.next().map(str::to_owned),
        ..Default::default()
    };
    if parts.next().is_some() {
        return None;
    }
    for pair in query
        .unwrap_or_default()
        .split('&')
        .filter(|p| !p.is_empty())
    {
        let (key, value) = pair.split_once('=').unwrap_or((pair, "true"));
        match key {
            "follow" => request.follow = flag(value),
            "previous" => request.previous = flag(value),
            "tailLines" => request.tail_lines = value.parse().ok(),
            "limitBytes" => request.limit_bytes = value.parse().ok(),
            _ => {}
        }
    }
    Some(request)
}

/// The offset where the last `lines` lines of `content` start (pure).
pub fn tail_offset(content: &[u8], lines: usize) -> usize {
    if lines == 0 {
        return content.len();
    }
    let body = content.strip_suffix(b"\n").unwrap_or(content);
    let mut seen = 0;
    for (i, byte) in body.iter().enumerate().rev() {
        if *byte == b'\n' {
            seen += 1;
            if seen == lines {
                return i + 1;
            }
        }
    }
    0
}

fn text(status: StatusCode, message: &str) -> Response<Body> {
    let body = Full::new(Bytes::from(format!("{message}\n")))
        .map_err(|never| match never {})
        .boxed();
    let mut response = Response::new(body);
    *response.status_mut() = status;
    response
}

/// Where reading starts: the tail window of `path` or its beginning.
async fn start_offset(path: &Path, tail_lines: Option<usize>) -> std::io::Result<u64> {
    let Some(lines) = tail_lines else {
        return Ok(0);
    };
    // Look at most at the last 8 MiB for the window.
    let mut file = tokio::fs::File::open(path).await?;
    let len = file.metadata().await?.len();
    let window = len.min(8 * 1024 * 1024);
    file.seek(std::io::SeekFrom::Start(len - window)).await?;
    let mut buffer = Vec::with_capacity(usize::try_from(window).unwrap_or(0));
    file.read_to_end(&mut buffer).await?;
    Ok(len - window + u64::try_from(tail_offset(&buffer, lines)).unwrap_or(0))
}

async fn stream_log(
    rt: Arc<NodeRuntime>,
    request: LogRequest,
    path: std::path::PathBuf,
    tx: mpsc::Sender<Result<Frame<Bytes>, std::io::Error>>,
) {
    let Ok(mut offset) = start_offset(&path, request.tail_lines).await else {
        return;
    };
    let mut budget = request.limit_bytes.unwrap_or(u64::MAX);
    let deadline = tokio::time::Instant::now() + MAX_FOLLOW;
    let mut buffer = vec![0u8; CHUNK];
    loop {
        let mut progressed = false;
        if let Ok(mut file) = tokio::fs::File::open(&path).await {
            if file.seek(std::io::SeekFrom::Start(offset)).await.is_ok() {
                while budget > 0 {
                    let want = usize::try_from(budget.min(CHUNK as u64)).unwrap_or(CHUNK);
                    let Ok(n) = file.read(&mut buffer[..want]).await else {
                        break;
                    };
                    if n == 0 {
                        break;
                    }
                    progressed = true;
                    offset += n as u64;
                    budget -= n as u64;
                    if tx
                        .send(Ok(Frame::data(Bytes::copy_from_slice(&buffer[..n]))))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            }
        }
        if !request.follow || budget == 0 || tokio::time::Instant::now() >= deadline {
            return;
        }
        let running = rt
            .log_files(
                &request.namespace,
                &request.pod,
                request.container.as_deref(),
            )
            .is_some_and(|f| f.running && f.current == path);
        if !running && !progressed {
            return;
        }
        tokio::select! {
            _ = tx.closed() => return,
            _ = tokio::time::sleep(FOLLOW_POLL) => {}
        }
    }
}

async fn handle(
    rt: Arc<NodeRuntime>,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    if req.method() != Method::GET {
        return Ok(text(StatusCode::METHOD_NOT_ALLOWED, "only GET is served"));
    }
    let path = req.uri().path().to_owned();
    if path == "/healthz" {
        return Ok(text(StatusCode::OK, "ok"));
    }
    let Some(request) = parse_log_request(&path, req.uri().query()) else {
        return Ok(text(
            StatusCode::NOT_FOUND,
            "cachalot-standin serves only /containerLogs and /healthz",
        ));
    };
    let Some(files) = rt.log_files(
        &request.namespace,
        &request.pod,
        request.container.as_deref(),
    ) else {
        return Ok(text(
            StatusCode::NOT_FOUND,
            &format!(
                "container {:?} of pod {}/{} is not on this node",
                request.container.as_deref().unwrap_or_default(),
                request.namespace,
                request.pod
            ),
        ));
    };
    let path = if request.previous {
        files.previous
    } else {
        files.current
    };
    if !path.exists() {
        let message = if request.previous {
            "previous terminated container not found"
        } else {
            "container has not started yet"
        };
        return Ok(text(StatusCode::BAD_REQUEST, message));
    }
    let (tx, rx) = mpsc::channel(8);
    let follow_request = LogRequest {
        follow: request.follow && !request.previous,
        ..request
    };
    tokio::spawn(stream_log(rt, follow_request, path, tx));
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    let mut response = Response::new(BodyExt::boxed(StreamBody::new(stream)));
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain"),
    );
    Ok(response)
}

/// Why the kubelet API could not be served.
#[derive(Debug, thiserror::Error)]
pub enum ServeKubeletApiError {
    /// The certificate could not be generated.
    #[error("generate the self-signed certificate: {0}")]
    Certificate(#[from] rcgen::Error),
    /// The TLS configuration was refused.
    #[error("configure TLS: {0}")]
    Tls(#[from] rustls::Error),
    /// The port could not be bound.
    #[error("listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
}

/// A TLS acceptor with a fresh self-signed certificate for `names` (DNS names or IPs).
pub fn self_signed_acceptor(names: Vec<String>) -> Result<TlsAcceptor, ServeKubeletApiError> {
    crate::api_client::install_crypto();
    let certified = rcgen::generate_simple_self_signed(names)?;
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
        certified.signing_key.serialize_der(),
    ));
    let mut config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(vec![certified.cert.der().clone()], key)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// Serves the kubelet API on `addr` until `cancel`.
pub async fn serve(
    addr: SocketAddr,
    names: Vec<String>,
    rt: Arc<NodeRuntime>,
    cancel: CancellationToken,
) -> Result<(), ServeKubeletApiError> {
    let acceptor = self_signed_acceptor(names)?;
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| ServeKubeletApiError::Bind { addr, source })?;
    info!(%addr, "kubelet API listening");
    let connections = tokio_util::task::TaskTracker::new();
    loop {
        let accepted = tokio::select! {
            _ = cancel.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let Ok((stream, peer)) = accepted else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let acceptor = acceptor.clone();
        let rt = rt.clone();
        let cancel = cancel.clone();
        connections.spawn(async move {
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(error)) => {
                    debug!(%peer, %error, "TLS handshake failed");
                    return;
                }
                Err(_) => return,
            };
            let service = service_fn(move |req| handle(rt.clone(), req));
            let connection = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tls), service);
            tokio::select! {
                _ = cancel.cancelled() => {}
                result = connection => {
                    if let Err(error) = result {
                        debug!(%peer, %error, "kubelet API connection ended");
                    }
                }
            }
        });
    }
    connections.close();
    let _ = tokio::time::timeout(Duration::from_secs(2), connections.wait()).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;

    #[test]
    fn log_requests_parse_path_and_query() {
        let request = parse_log_request(
            "/containerLogs/ns/web-0/app",
            Some("follow=true&tailLines=10&limitBytes=100&timestamps=true"),
        )
        .unwrap();
        assert_eq!(
            request,
            LogRequest {
                namespace: "ns".into(),
                pod: "web-0".into(),
                container: Some("app".into()),
                follow: true,
                previous: false,
                tail_lines: Some(10),
                limit_bytes: Some(100),
            }
        );
        assert_eq!(
            parse_log_request("/containerLogs/ns/web-0", None)
                .unwrap()
                .container,
            None
        );
        assert!(parse_log_request("/exec/ns/web-0/app", None).is_none());
        assert!(parse_log_request("/containerLogs/ns", None).is_none());
        assert!(parse_log_request("/containerLogs/ns/p/c/extra", None).is_none());
        assert!(
            parse_log_request("/containerLogs/ns/p/c", Some("previous=true"))
                .unwrap()
                .previous
        );
    }

    #[test]
    fn tail_offsets_keep_the_last_lines() {
        let content = b"one\ntwo\nthree\n";
        assert_eq!(&content[tail_offset(content, 1)..], b"three\n");
        assert_eq!(&content[tail_offset(content, 2)..], b"two\nthree\n");
        assert_eq!(tail_offset(content, 5), 0);
        assert_eq!(tail_offset(content, 0), content.len());
        let partial = b"one\ntwo";
        assert_eq!(&partial[tail_offset(partial, 1)..], b"two");
    }
}
