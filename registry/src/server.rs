//! Process wiring: logging, building the proxy from the config, the two listeners (public: the
//! pull API; admin: metrics, stats and `/admin/`) served by one accept loop with the same
//! per-connection settings (header read timeouts), the periodic flush of the cache's last-use
//! times (and, with shared storage, the shared tier's upkeep), a spoke's follower of its
//! parent's purge log, and graceful shutdown on SIGTERM/SIGINT (which flushes them once more
//! after the last fetch committed).

use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;

use crate::api::{self, AppState};
use crate::config::{Config, LogFormat};
use crate::proxy::{BuildProxyError, Proxy};
use crate::telemetry::Telemetry;

/// Why the registry could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Build(#[from] BuildProxyError),
    #[error("storage.s3: {0}")]
    Shared(#[from] crate::store::shared::SharedStoreError),
    #[error("storage.s3: the object storage did not answer within {}s", .0.as_secs())]
    SharedTimeout(Duration),
    #[error(transparent)]
    Tls(#[from] crate::tls::LoadTlsError),
    #[error("auth.bearerTokenFile: {0}")]
    Auth(#[from] crate::token_file::LoadTokenError),
    #[error(transparent)]
    PurgeFanout(#[from] crate::api::purge_fanout::BuildPurgeFanoutError),
    #[error("cannot listen on {addr} (`{field}`, the {role} listener): {source}")]
    Listen {
        /// The config field of the address: `listen` or `adminListen`.
        field: &'static str,
        /// `public` or `admin`.
        role: &'static str,
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
}

/// How long the start-up check of the shared object storage may take.
const SHARED_CHECK_TIMEOUT: Duration = Duration::from_secs(30);

/// Installs the tracing subscriber described by the config (`RUST_LOG` wins over `log.level`).
pub fn init_logging(config: &Config) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new(config.log.level.as_deref().unwrap_or("info"))
    });
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    let _ = match config.log.format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

/// A bound, ready-to-serve registry.
#[derive(Debug)]
pub struct Server {
    /// The public listener: the pull API and health.
    listener: TcpListener,
    /// The admin listener: metrics, stats, health and `/admin/`.
    admin_listener: TcpListener,
    state: Arc<AppState>,
    connection: ConnectionSettings,
    last_use_flush_interval: Duration,
    /// The token the pull API requires (`auth`), on the public listener.
    auth: Option<Arc<crate::token_file::TokenFile>>,
}

/// What every accepted connection is served with, on either listener.
#[derive(Debug, Clone)]
struct ConnectionSettings {
    header_read_timeout: Duration,
    /// TLS (`tls`), on the public listener only: the admin listener stays plain and internal.
    tls: Option<crate::tls::Acceptor>,
}

/// Binds one listener, naming it in the error.
async fn bind_listener(
    addr: std::net::SocketAddr,
    field: &'static str,
    role: &'static str,
) -> Result<TcpListener, ServeError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| ServeError::Listen {
            field,
            role,
            addr,
            source,
        })
}

/// Accepts connections on `listener` and serves each with `app` until the future is dropped
/// (at shutdown); the connections themselves are watched by `graceful`.
async fn accept_loop(
    listener: &TcpListener,
    app: axum::Router,
    settings: &ConnectionSettings,
    graceful: &hyper_util::server::graceful::GracefulShutdown,
) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(a) => a,
            Err(e) => {
                // Typically EMFILE: back off briefly instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        serve_connection(stream, peer, app.clone(), settings, graceful);
    }
}

/// The per-connection setup, the same for both listeners: the TLS handshake (bounded by the
/// header read timeout) when the listener has TLS, HTTP/1 and HTTP/2, the header read timeout,
/// upgrades, and graceful shutdown.
fn serve_connection(
    stream: tokio::net::TcpStream,
    peer: std::net::SocketAddr,
    app: axum::Router,
    settings: &ConnectionSettings,
    graceful: &hyper_util::server::graceful::GracefulShutdown,
) {
    let _ = stream.set_nodelay(true);
    let service = TowerToHyperService::new(app);
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(settings.header_read_timeout);
    let watcher = graceful.watcher();
    let (tls, handshake_timeout) = (settings.tls.clone(), settings.header_read_timeout);
    tokio::spawn(async move {
        let Some(stream) = crate::tls::accept(tls.as_ref(), stream, peer, handshake_timeout).await
        else {
            return;
        };
        let conn = builder
            .serve_connection_with_upgrades(TokioIo::new(stream), service)
            .into_owned();
        if let Err(e) = watcher.watch(conn).await {
            tracing::debug!(%peer, error = %e, "connection ended with an error");
        }
    });
}

/// Writes the cache's last-use times (on the blocking pool: it opens files), logging failures.
async fn flush_last_use(store: Arc<crate::store::Store>) {
    let flushed = tokio::task::spawn_blocking(move || store.flush_last_use()).await;
    match flushed {
        Ok(flush) if flush.failed > 0 => tracing::warn!(
            written = flush.written,
            failed = flush.failed,
            "cannot record the last use of some cached files; their LRU position after a restart is older"
        ),
        Ok(flush) => tracing::debug!(written = flush.written, "last use recorded"),
        Err(e) => tracing::warn!(error = %e, "last-use flush task failed"),
    }
}

impl Server {
    /// Builds the proxy and binds the public and the admin listen addresses.
    pub async fn bind(config: &Config) -> Result<Server, ServeError> {
        let telemetry = Arc::new(Telemetry::new(config.registries.keys().map(String::as_str)));
        let proxy = Proxy::new(config, Arc::clone(&telemetry))?;
        if let Some(s3) = &config.storage.s3 {
            // A missing bucket, wrong keys, an unreachable endpoint or a prefix another mirror
            // claimed stop the start here, with one line, before anything is served.
            tokio::time::timeout(SHARED_CHECK_TIMEOUT, proxy.claim_shared(&s3.owner))
                .await
                .map_err(|_| ServeError::SharedTimeout(SHARED_CHECK_TIMEOUT))??;
        }
        let tls = config
            .tls
            .as_ref()
            .map(crate::tls::Acceptor::new)
            .transpose()?;
        let auth = (config.auth.as_ref())
            .map(|a| crate::token_file::TokenFile::load(&a.bearer_token_file).map(Arc::new))
            .transpose()?;
        let listener = bind_listener(config.listen, "listen", "public").await?;
        let admin_listener = bind_listener(config.admin_listen, "adminListen", "admin").await?;
        Ok(Server {
            listener,
            admin_listener,
            state: Arc::new(AppState {
                proxy,
                telemetry,
                default_registry: config.default_registry.clone(),
                purge_fanout: crate::api::purge_fanout::PurgeFanout::from_config(config)?,
            }),
            connection: ConnectionSettings {
                header_read_timeout: config.server.header_read_timeout,
                tls,
            },
            last_use_flush_interval: config.storage.last_use_flush_interval,
            auth,
        })
    }

    /// The public listener's address (the pull API).
    pub fn local_addr(&self) -> std::io::Result<std::net::SocketAddr> {
        self.listener.local_addr()
    }

    /// The admin listener's address (`/metrics`, `/stats`, `/admin/`).
    pub fn admin_addr(&self) -> std::io::Result<std::net::SocketAddr> {
        self.admin_listener.local_addr()
    }

    /// Serves until `shutdown` resolves, then lets open connections finish (bounded).
    pub async fn run(self, shutdown: impl std::future::Future<Output = ()>) {
        let mut public = api::public_router(Arc::clone(&self.state));
        if let Some(token) = &self.auth {
            public = api::auth::require(public, Arc::clone(token));
        }
        let admin = api::admin_router(Arc::clone(&self.state));
        let graceful = hyper_util::server::graceful::GracefulShutdown::new();
        let store = Arc::clone(&self.state.proxy.inner().store);
        let period = self.last_use_flush_interval;
        let flusher = tokio::spawn(async move {
            let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                flush_last_use(Arc::clone(&store)).await;
            }
        });
        let upkeep = (self.state.proxy.inner().shared.is_some()).then(|| {
            let inner = Arc::clone(self.state.proxy.inner());
            tokio::spawn(async move {
                let mut tick =
                    tokio::time::interval_at(tokio::time::Instant::now() + period, period);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tick.tick().await;
                    inner.shared_upkeep_pass().await;
                }
            })
        });
        // A spoke follows its parent's purge log (one task: one fetch in flight at a time).
        let purge_follower =
            self.state
                .proxy
                .inner()
                .upstreams
                .parent_purges()
                .map(|(signal, parent)| {
                    let inner = Arc::clone(self.state.proxy.inner());
                    let fanout = self.state.purge_fanout.clone();
                    tokio::spawn(crate::purge_sync::run(inner, signal, parent, fanout))
                });
        let admin_settings = ConnectionSettings {
            tls: None,
            ..self.connection.clone()
        };
        tokio::select! {
            () = accept_loop(&self.listener, public, &self.connection, &graceful) => {}
            () = accept_loop(&self.admin_listener, admin, &admin_settings, &graceful) => {}
            () = shutdown => {}
        }
        tracing::info!("shutting down; waiting for open connections");
        if tokio::time::timeout(Duration::from_secs(10), graceful.shutdown())
            .await
            .is_err()
        {
            tracing::warn!("connections still open after 10s; exiting anyway");
        }
        // Fetches run in their own tasks; let them verify and commit what they started.
        if !self.state.proxy.wait_idle(Duration::from_secs(30)).await {
            tracing::warn!("fetches still running after 30s; their temp files are discarded");
        }
        flusher.abort();
        if let Some(follower) = purge_follower {
            follower.abort();
        }
        flush_last_use(Arc::clone(&self.state.proxy.inner().store)).await;
        if let Some(upkeep) = upkeep {
            upkeep.abort();
            let inner = self.state.proxy.inner();
            if let Some(shared) = &inner.shared {
                let id = &inner.shared_upkeep;
                if let Err(e) = id.last_use.flush(shared, id.replica_id()).await {
                    tracing::warn!(error = %e, "cannot record last uses in the shared storage at shutdown");
                }
            }
        }
    }
}

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
