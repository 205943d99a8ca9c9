//! Single-flight: concurrent callers with the same key share one execution of the work.
//!
//! The work runs in its own task, so it finishes (and fills the cache) even when every caller has
//! gone away. The key is removed when the work completes, before waiters see the result, so a
//! caller that arrives later starts afresh and finds the cache already filled.

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::sync::{Arc, Mutex, MutexGuard};

use futures::future::{BoxFuture, FutureExt, Shared};

use super::ProxyError;

type SharedResult<T> = Shared<BoxFuture<'static, Result<T, ProxyError>>>;

/// Coalesces concurrent work by key.
pub struct SingleFlight<K, T: Clone> {
    inflight: Arc<Mutex<HashMap<K, SharedResult<T>>>>,
}

impl<K, T: Clone> std::fmt::Debug for SingleFlight<K, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SingleFlight")
    }
}

impl<K, T: Clone> Default for SingleFlight<K, T> {
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

impl<K, T> SingleFlight<K, T>
where
    K: Hash + Eq + Clone + Send + 'static,
    T: Clone + Send + Sync + 'static,
{
    /// Runs `make()` unless work for `key` is already in flight, and returns its result and
    /// whether this caller started it.
    pub async fn run<F>(&self, key: K, make: impl FnOnce() -> F) -> (Result<T, ProxyError>, bool)
    where
        F: Future<Output = Result<T, ProxyError>> + Send + 'static,
    {
        let (shared, leader) = {
            let mut map = lock(&self.inflight);
            match map.get(&key) {
                Some(existing) => (existing.clone(), false),
                None => {
                    let inflight = Arc::clone(&self.inflight);
                    let task_key = key.clone();
                    let work = make();
                    // The map lock is held until the entry is inserted, so the task's removal
                    // below always happens after the insert.
                    let handle = tokio::spawn(async move {
                        let out = work.await;
                        lock(&inflight).remove(&task_key);
                        out
                    });
                    let shared = async move {
                        handle.await.unwrap_or_else(|e| {
                            Err(ProxyError::Internal(format!("fetch task failed: {e}")))
                        })
                    }
                    .boxed()
                    .shared();
                    map.insert(key, shared.clone());
                    (shared, true)
                }
            }
        };
        (shared.await, leader)
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
