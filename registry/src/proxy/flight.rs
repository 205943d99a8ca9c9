//! Single-flight: concurrent callers with the same key share one execution of the work.
//!
//! The work runs in its own task, so it finishes (and fills the cache) even when every caller has
//! gone away, or stopped waiting for it. The key is removed when the work completes, before
//! waiters see the result, so a caller that arrives later starts afresh and finds the cache
//! already filled. Each flight remembers when it started, so callers can bound their wait from
//! that moment rather than from their own arrival.

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use futures::future::{BoxFuture, FutureExt, Shared};

use super::ProxyError;

/// The error every waiter of a flight gets when its task ended without a result (it panicked
/// or the runtime is shutting down).
pub trait FlightError: Clone + Send + Sync + 'static {
    fn task_failed(message: String) -> Self;
}

impl FlightError for ProxyError {
    fn task_failed(message: String) -> Self {
        ProxyError::Internal(format!("fetch task failed: {message}"))
    }
}

/// The shared result of one execution.
pub type Flight<T, E> = Shared<BoxFuture<'static, Result<T, E>>>;

/// A caller's handle on a flight.
pub struct Joined<T, E> {
    /// Resolves to the work's result; may be awaited (cloned) by any number of callers.
    pub flight: Flight<T, E>,
    /// Whether this caller started the work.
    pub leader: bool,
    /// When the work started.
    pub started: Instant,
}

/// The flights under way, each with its start.
type InFlight<K, T, E> = Arc<Mutex<HashMap<K, (Flight<T, E>, Instant)>>>;

/// Coalesces concurrent work by key.
pub struct SingleFlight<K, T: Clone, E: Clone = ProxyError> {
    inflight: InFlight<K, T, E>,
}

impl<K, T: Clone, E: Clone> std::fmt::Debug for SingleFlight<K, T, E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SingleFlight")
    }
}

impl<K, T: Clone, E: Clone> Default for SingleFlight<K, T, E> {
    fn default() -> Self {
        SingleFlight {
            inflight: Arc::new(Mutex::new(HashMap::new())),
        }
    }
}

fn lock<K, V>(m: &Mutex<HashMap<K, V>>) -> MutexGuard<'_, HashMap<K, V>> {
    // The map holds only futures; a panic elsewhere cannot leave it half-updated.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl<K, T, E> SingleFlight<K, T, E>
where
    K: Hash + Eq + Clone + Send + 'static,
    T: Clone + Send + Sync + 'static,
    E: FlightError,
{
    /// Runs `make()` unless work for `key` is already in flight, and returns its result and
    /// whether this caller started it.
    pub async fn run<F>(&self, key: K, make: impl FnOnce() -> F) -> (Result<T, E>, bool)
    where
        F: Future<Output = Result<T, E>> + Send + 'static,
    {
        let joined = self.join(key, make);
        (joined.flight.await, joined.leader)
    }

    /// Starts `make()` in its own task unless work for `key` is already in flight, and returns
    /// a handle on that work without waiting for it.
    pub fn join<F>(&self, key: K, make: impl FnOnce() -> F) -> Joined<T, E>
    where
        F: Future<Output = Result<T, E>> + Send + 'static,
    {
        let mut map = lock(&self.inflight);
        if let Some((existing, started)) = map.get(&key) {
            return Joined {
                flight: existing.clone(),
                leader: false,
                started: *started,
            };
        }
        let inflight = Arc::clone(&self.inflight);
        let task_key = key.clone();
        let work = make();
        // The map lock is held until the entry is inserted, so the task's removal below always
        // happens after the insert.
        let handle = tokio::spawn(async move {
            let out = work.await;
            lock(&inflight).remove(&task_key);
            out
        });
        let shared = async move {
            handle
                .await
                .unwrap_or_else(|e| Err(E::task_failed(e.to_string())))
        }
        .boxed()
        .shared();
        let started = Instant::now();
        map.insert(key, (shared.clone(), started));
        Joined {
            flight: shared,
            leader: true,
            started,
        }
    }

    /// Number of keys in flight (for tests and diagnostics).
    pub fn len(&self) -> usize {
        lock(&self.inflight).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test]
    async fn concurrent_callers_share_one_execution() {
        let flights: Arc<SingleFlight<&'static str, u32>> = Arc::default();
        let runs = Arc::new(AtomicUsize::new(0));
        let (release_tx, release_rx) = tokio::sync::watch::channel(false);
        let mut callers = Vec::new();
        for _ in 0..8 {
            let flights = Arc::clone(&flights);
            let runs = Arc::clone(&runs);
            let mut release = release_rx.clone();
            callers.push(tokio::spawn(async move {
                flights
                    .run("k", move || async move {
                        runs.fetch_add(1, Ordering::SeqCst);
                        let _ = release.wait_for(|r| *r).await;
                        Ok(42)
                    })
                    .await
            }));
        }
        // Every caller has joined once the work is running and the key is present.
        tokio::time::timeout(std::time::Duration::from_secs(5), async {
            while runs.load(Ordering::SeqCst) == 0 {
                tokio::task::yield_now().await;
            }
        })
        .await
        .unwrap();
        release_tx.send(true).unwrap();
        let mut leaders = 0;
        for c in callers {
            let (result, leader) = c.await.unwrap();
            assert_eq!(result.unwrap(), 42);
            leaders += usize::from(leader);
        }
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        assert_eq!(leaders, 1);
        assert!(flights.is_empty());
    }
}
