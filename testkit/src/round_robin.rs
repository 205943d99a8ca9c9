//! A round-robin TCP proxy on 127.0.0.1: what a Kubernetes Service does in front of the replicas
//! of a mirror, without kube-proxy. Each accepted connection goes to the next backend in turn
//! (a backend that refuses the connection is skipped for that connection), and bytes are copied
//! both ways until either side closes. Connections are counted per backend so a test can show
//! that every replica took traffic.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::net::{TcpListener, TcpStream};

/// Why the proxy could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartRoundRobinError {
    /// The listening socket could not be bound.
    #[error("bind the round-robin proxy on 127.0.0.1: {0}")]
    Bind(#[source] std::io::Error),
    /// No backend was given.
    #[error("a round-robin proxy needs at least one backend")]
    NoBackends,
}

/// A running round-robin proxy; stops accepting when dropped.
#[derive(Debug)]
pub struct RoundRobin {
    addr: SocketAddr,
    accepted: Arc<Mutex<Vec<u64>>>,
    task: tokio::task::JoinHandle<()>,
}

impl RoundRobin {
    /// Starts a proxy spreading connections over `backends`.
    pub async fn start(backends: Vec<SocketAddr>) -> Result<RoundRobin, StartRoundRobinError> {
        if backends.is_empty() {
            return Err(StartRoundRobinError::NoBackends);
        }
        let listener = TcpListener::bind(("127.0.0.1", 0))
            .await
            .map_err(StartRoundRobinError::Bind)?;
        let addr = listener.local_addr().map_err(StartRoundRobinError::Bind)?;
        let accepted = Arc::new(Mutex::new(vec![0u64; backends.len()]));
        let counts = Arc::clone(&accepted);
        let next = Arc::new(AtomicUsize::new(0));
        let backends = Arc::new(backends);
        let task = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    continue;
                };
                let (backends, next, counts) = (
                    Arc::clone(&backends),
                    Arc::clone(&next),
                    Arc::clone(&counts),
                );
                tokio::spawn(async move {
                    let first = next.fetch_add(1, Ordering::Relaxed);
                    // Bounded: each backend is tried at most once per connection.
                    for i in 0..backends.len() {
                        let index = (first + i) % backends.len();
                        if let Ok(backend) = TcpStream::connect(backends[index]).await {
                            if let Ok(mut c) = counts.lock() {
                                c[index] += 1;
                            }
                            let (mut client, mut backend) = (client, backend);
                            let _ = client.set_nodelay(true);
                            let _ = backend.set_nodelay(true);
                            let _ = tokio::io::copy_bidirectional(&mut client, &mut backend).await;
                            return;
                        }
                    }
                });
            }
        });
        Ok(RoundRobin {
            addr,
            accepted,
            task,
        })
    }

    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The listening address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Connections handed to each backend so far, in the order the backends were given.
    pub fn accepted(&self) -> Vec<u64> {
        self.accepted.lock().map(|c| c.clone()).unwrap_or_default()
    }
}

impl Drop for RoundRobin {
    fn drop(&mut self) {
        self.task.abort();
    }
}
