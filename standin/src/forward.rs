//! `cachalot-standin forward`: a plain bidirectional byte pipe per connection between a TCP or
//! unix listener and a TCP or unix target, in whatever network namespace it was started.
//!
//! Unix sockets are not network-namespaced, so a pair of forwarders (one per namespace) bridges
//! namespaces through a socket file. The [`Endpoint`] type and [`pipe`] are shared with the
//! proxies.
//!
//! Invariants: at most [`MAX_CONNECTIONS`] connections are piped at once (further clients wait
//! in the accept queue); each connect has a deadline; a unix listener's socket file is replaced
//! at start and removed at exit; `tcp:…:0` writes the chosen port to `--port-file` (atomically,
//! after the listener is bound, so a reader that sees the file can connect).

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// Connections piped at once by one listener.
pub const MAX_CONNECTIONS: usize = 1024;
/// Deadline of one connect to the target.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A place to listen on or connect to: `tcp:HOST:PORT` or `unix:PATH`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Endpoint {
    /// `HOST:PORT` (an IP literal or a resolvable name).
    Tcp(String),
    /// A unix stream socket path.
    Unix(PathBuf),
}

/// Why an endpoint string is invalid.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ParseEndpointError {
    /// Neither `tcp:` nor `unix:`.
    #[error("`{0}` is neither tcp:HOST:PORT nor unix:PATH")]
    Scheme(String),
    /// `tcp:` without a `HOST:PORT` whose port is a number.
    #[error("`{0}` is not tcp:HOST:PORT")]
    Tcp(String),
    /// `unix:` with an empty path.
    #[error("`{0}` has an empty unix socket path")]
    Unix(String),
}

impl FromStr for Endpoint {
    type Err = ParseEndpointError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        if let Some(rest) = text.strip_prefix("tcp:") {
            let valid = rest
                .rsplit_once(':')
                .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
            if !valid {
                return Err(ParseEndpointError::Tcp(text.to_owned()));
            }
            Ok(Self::Tcp(rest.to_owned()))
        } else if let Some(rest) = text.strip_prefix("unix:") {
            if rest.is_empty() {
                return Err(ParseEndpointError::Unix(text.to_owned()));
            }
            Ok(Self::Unix(PathBuf::from(rest)))
        } else {
            Err(ParseEndpointError::Scheme(text.to_owned()))
        }
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Tcp(addr) => write!(f, "tcp:{addr}"),
            Self::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

/// A connected byte stream of either kind.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// Why a connect to an endpoint failed.
#[derive(Debug, thiserror::Error)]
pub enum ConnectEndpointError {
    /// The connect failed.
    #[error("connect to {endpoint}: {source}")]
    Io {
        /// The target.
        endpoint: Endpoint,
        /// Why.
        source: std::io::Error,
    },
    /// The connect did not finish in time.
    #[error("connect to {endpoint}: no answer within {CONNECT_TIMEOUT:?}")]
    Timeout {
        /// The target.
        endpoint: Endpoint,
    },
}

/// Connects to `endpoint` within [`CONNECT_TIMEOUT`].
pub async fn connect(endpoint: &Endpoint) -> Result<Box<dyn Io>, ConnectEndpointError> {
    let attempt = async {
        match endpoint {
            Endpoint::Tcp(addr) => {
                let stream = TcpStream::connect(addr.as_str()).await?;
                let _ = stream.set_nodelay(true);
                Ok::<Box<dyn Io>, std::io::Error>(Box::new(stream))
            }
            Endpoint::Unix(path) => {
                let stream: Box<dyn Io> = Box::new(UnixStream::connect(path).await?);
                Ok(stream)
            }
        }
    };
    match tokio::time::timeout(CONNECT_TIMEOUT, attempt).await {
        Ok(Ok(stream)) => Ok(stream),
        Ok(Err(source)) => Err(ConnectEndpointError::Io {
            endpoint: endpoint.clone(),
            source,
        }),
        Err(_) => Err(ConnectEndpointError::Timeout {
            endpoint: endpoint.clone(),
        }),
    }
}

/// Copies bytes both ways until both directions are closed; errors just end the pipe.
pub async fn pipe(mut client: Box<dyn Io>, mut upstream: Box<dyn Io>) {
    match tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
        Ok((up, down)) => debug!(up, down, "connection closed"),
        Err(error) => debug!(%error, "connection ended"),
    }
}

/// A bound listener of either kind.
pub enum Listener {
    /// TCP.
    Tcp(TcpListener),
    /// Unix, with the socket file it owns.
    Unix(UnixListener, PathBuf),
}

impl fmt::Debug for Listener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Tcp(listener) => write!(f, "Listener::Tcp({:?})", listener.local_addr().ok()),
            Self::Unix(_, path) => write!(f, "Listener::Unix({})", path.display()),
        }
    }
}

/// Why a listener could not be bound.
#[derive(Debug, thiserror::Error)]
pub enum BindListenerError {
    /// The address could not be bound.
    #[error("listen on {endpoint}: {source}")]
    Bind {
        /// The address.
        endpoint: Endpoint,
        /// Why.
        source: std::io::Error,
    },
    /// A stale socket file could not be removed.
    #[error("remove stale socket {path}: {source}")]
    RemoveStale {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

impl Listener {
    /// Binds `endpoint`; a unix socket file left by an earlier run is replaced.
    pub async fn bind(endpoint: &Endpoint) -> Result<Self, BindListenerError> {
        let bind_error = |source| BindListenerError::Bind {
            endpoint: endpoint.clone(),
            source,
        };
        match endpoint {
            Endpoint::Tcp(addr) => Ok(Self::Tcp(
                TcpListener::bind(addr.as_str()).await.map_err(bind_error)?,
            )),
            Endpoint::Unix(path) => {
                match std::fs::remove_file(path) {
                    Ok(()) => {}
                    Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
                    Err(source) => {
                        return Err(BindListenerError::RemoveStale {
                            path: path.clone(),
                            source,
                        })
                    }
                }
                Ok(Self::Unix(
                    UnixListener::bind(path).map_err(bind_error)?,
                    path.clone(),
                ))
            }
        }
    }

    /// The bound TCP port, if TCP.
    pub fn tcp_port(&self) -> Option<u16> {
        match self {
            Self::Tcp(listener) => listener.local_addr().ok().map(|addr| addr.port()),
            Self::Unix(..) => None,
        }
    }

    /// Accepts one connection.
    pub async fn accept(&self) -> std::io::Result<Box<dyn Io>> {
        match self {
            Self::Tcp(listener) => {
                let (stream, _) = listener.accept().await?;
                let _ = stream.set_nodelay(true);
                Ok(Box::new(stream))
            }
            Self::Unix(listener, _) => {
                let (stream, _) = listener.accept().await?;
                Ok(Box::new(stream))
            }
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Self::Unix(_, path) = self {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// `cachalot-standin forward`.
#[derive(Debug, Clone, clap::Args)]
pub struct ForwardArgs {
    /// Where to listen: `tcp:HOST:PORT` (port 0 picks a free port) or `unix:PATH`.
    #[arg(long)]
    pub listen: Endpoint,
    /// Where each accepted connection is piped to: `tcp:HOST:PORT` or `unix:PATH`.
    #[arg(long)]
    pub connect: Endpoint,
    /// Write the bound TCP port (decimal, no newline) to this file once listening.
    #[arg(long)]
    pub port_file: Option<PathBuf>,
}

/// Why `forward` stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    /// The listener could not be bound.
    #[error(transparent)]
    Bind(#[from] BindListenerError),
    /// `--port-file` was given for a unix listener.
    #[error("--port-file needs a tcp listener")]
    PortFileNeedsTcp,
    /// The port file could not be written.
    #[error("write port file {path}: {source}")]
    WritePortFile {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// Writes `contents` to `path` through a temporary file and a rename.
pub fn write_file_atomically(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    std::fs::write(&tmp, contents)?;
    std::fs::rename(&tmp, path)
}

/// Serves `listener`, piping each connection to `target`, until `cancel`.
pub async fn serve(listener: Listener, target: Endpoint, cancel: CancellationToken) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let connections = tokio_util::task::TaskTracker::new();
    loop {
        let permit = tokio::select! {
            _ = cancel.cancelled() => break,
            permit = slots.clone().acquire_owned() => permit,
        };
        let Ok(permit) = permit else {
            break;
        };
        let accepted = tokio::select! {
            _ = cancel.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let client = match accepted {
            Ok(client) => client,
            Err(error) => {
                warn!(%error, "accept failed");
                // Out of file descriptors and the like: do not spin.
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let target = target.clone();
        let cancel = cancel.clone();
        connections.spawn(async move {
            let _permit = permit;
            match connect(&target).await {
                Ok(upstream) => {
                    tokio::select! {
                        _ = cancel.cancelled() => {}
                        _ = pipe(client, upstream) => {}
                    }
                }
                Err(error) => warn!(%error, "cannot reach the target; closing the client"),
            }
        });
    }
    connections.close();
    let _ = tokio::time::timeout(Duration::from_secs(5), connections.wait()).await;
}

/// Runs `forward` until `cancel`.
pub async fn run(args: ForwardArgs, cancel: CancellationToken) -> Result<(), ForwardError> {
    let listener = Listener::bind(&args.listen).await?;
    if let Some(path) = &args.port_file {
        let port = listener.tcp_port().ok_or(ForwardError::PortFileNeedsTcp)?;
        write_file_atomically(path, port.to_string().as_bytes()).map_err(|source| {
            ForwardError::WritePortFile {
                path: path.clone(),
                source,
            }
        })?;
    }
    info!(listen = %args.listen, connect = %args.connect, "forwarding");
    serve(listener, args.connect, cancel).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;

    #[test]
    fn endpoints_parse_tcp_and_unix_and_reject_the_rest() {
        assert_eq!(
            "tcp:127.0.0.1:0".parse::<Endpoint>(),
            Ok(Endpoint::Tcp("127.0.0.1:0".to_owned()))
        );
        assert_eq!(
            "unix:/x/api.sock".parse::<Endpoint>(),
            Ok(Endpoint::Unix(PathBuf::from("/x/api.sock")))
        );
        assert!(matches!(
            "127.0.0.1:80".parse::<Endpoint>(),
            Err(ParseEndpointError::Scheme(_))
        ));
        assert!(matches!(
            "tcp:127.0.0.1".parse::<Endpoint>(),
            Err(ParseEndpointError::Tcp(_))
        ));
        assert!(matches!(
            "tcp::80".parse::<Endpoint>(),
            Err(ParseEndpointError::Tcp(_))
        ));
        assert!(matches!(
            "unix:".parse::<Endpoint>(),
            Err(ParseEndpointError::Unix(_))
        ));
    }

    #[test]
    fn endpoints_display_as_they_parse() {
        for text in ["tcp:10.0.0.1:5000", "unix:/run/x.sock"] {
            assert_eq!(text.parse::<Endpoint>().unwrap().to_string(), text);
        }
    }
}
