//! Bounded waiting and loopback port allocation.
//!
//! Tests never sleep to wait for something: they poll a condition with [`wait_until`] or
//! [`wait_for`], which always give up after a deadline and after a bounded number of attempts.
//! [`free_port`] asks the kernel for an unused 127.0.0.1 port for child processes that must be
//! told their listen address up front.

use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::time::{Duration, Instant};

/// Why a bounded wait ended without the condition holding.
#[derive(Debug, thiserror::Error)]
pub enum WaitError {
    /// The condition never held before the deadline.
    #[error("condition not met after {elapsed:?} ({attempts} attempts)")]
    TimedOut {
        /// Time spent polling.
        elapsed: Duration,
        /// Number of times the condition was evaluated.
        attempts: u64,
    },
}

/// Why no free loopback port could be found.
#[derive(Debug, thiserror::Error)]
pub enum FindFreePortError {
    /// Binding `127.0.0.1:0` or reading its address failed.
    #[error("bind 127.0.0.1:0 to find a free port")]
    Bind {
        /// The underlying I/O error.
        source: std::io::Error,
    },
}

/// Upper bound on attempts whatever the poll interval, so a zero interval cannot spin forever.
const MAX_ATTEMPTS: u64 = 1_000_000;

/// Polls `condition` every `poll` until it returns `Some(value)`, for at most `timeout`.
///
/// The condition is evaluated at least once, even with a zero timeout.
///
/// # Errors
/// [`WaitError::TimedOut`] when the deadline passes first.
pub async fn wait_for<T, F, Fut>(
    timeout: Duration,
    poll: Duration,
    mut condition: F,
) -> Result<T, WaitError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let start = Instant::now();
    let deadline = start + timeout;
    let mut attempts = 0_u64;
    loop {
        attempts += 1;
        // A condition that hangs must not defeat the deadline.
        let remaining = deadline.saturating_duration_since(Instant::now());
        if let Ok(Some(value)) =
            tokio::time::timeout(remaining.max(Duration::from_millis(1)), condition()).await
        {
            return Ok(value);
        }
        let now = Instant::now();
        if now >= deadline || attempts >= MAX_ATTEMPTS {
            return Err(WaitError::TimedOut {
                elapsed: now - start,
                attempts,
            });
        }
        tokio::time::sleep(poll.min(deadline - now)).await;
    }
}

/// Polls `condition` every `poll` until it returns `true`, for at most `timeout`.
///
/// # Errors
/// [`WaitError::TimedOut`] when the deadline passes first.
pub async fn wait_until<F, Fut>(
    timeout: Duration,
    poll: Duration,
    mut condition: F,
) -> Result<(), WaitError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    wait_for(timeout, poll, || {
        let fut = condition();
        async move { fut.await.then_some(()) }
    })
    .await
}

/// Returns a TCP port on 127.0.0.1 that was free a moment ago.
///
/// The port is released before returning, so another process could take it; callers that start a
/// child on it should retry with a fresh port if the child fails to bind.
///
/// # Errors
/// [`FindFreePortError::Bind`] when the kernel refuses the bind.
pub fn free_port() -> Result<u16, FindFreePortError> {
    let listener = TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
        .map_err(|source| FindFreePortError::Bind { source })?;
    let addr = listener
        .local_addr()
        .map_err(|source| FindFreePortError::Bind { source })?;
    Ok(addr.port())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Arc;

    #[tokio::test]
    async fn wait_until_returns_once_the_condition_holds() {
        let calls = Arc::new(AtomicU32::new(0));
        let c = calls.clone();
        wait_until(
            Duration::from_secs(5),
            Duration::from_millis(1),
            move || {
                let c = c.clone();
                async move { c.fetch_add(1, Ordering::SeqCst) >= 2 }
            },
        )
        .await
        .unwrap();
        assert_eq!(calls.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn wait_until_times_out_when_the_condition_never_holds() {
        let start = Instant::now();
        let err = wait_until(
            Duration::from_millis(50),
            Duration::from_millis(5),
            || async { false },
        )
        .await
        .unwrap_err();
        let WaitError::TimedOut { attempts, .. } = err;
        assert!(attempts >= 2, "polled {attempts} times");
        assert!(start.elapsed() < Duration::from_secs(2));
    }

    #[tokio::test]
    async fn wait_for_gives_up_on_a_condition_that_hangs() {
        let start = Instant::now();
        let result: Result<(), _> =
            wait_for(Duration::from_millis(50), Duration::from_millis(5), || {
                std::future::pending::<Option<()>>()
            })
            .await;
        assert!(result.is_err());
        assert!(start.elapsed() < Duration::from_secs(2));
    }

    #[test]
    fn free_port_returns_a_bindable_loopback_port() {
        let port = free_port().unwrap();
        assert_ne!(port, 0);
        TcpListener::bind(("127.0.0.1", port)).unwrap();
    }
}
