//! Process shutdown: one [`CancellationToken`] cancelled on the first SIGTERM or SIGINT.
//!
//! Invariant: every long-running task of a command takes a child of this token and returns
//! promptly once it is cancelled; the command then bounds its clean-up with its own deadline.

use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;

/// Why the signal handlers could not be installed.
#[derive(Debug, thiserror::Error)]
#[error("install the SIGTERM/SIGINT handlers: {0}")]
pub struct InstallSignalHandlersError(#[from] std::io::Error);

/// A token cancelled on the first SIGTERM or SIGINT the process receives.
pub fn on_signal() -> Result<CancellationToken, InstallSignalHandlersError> {
    let token = CancellationToken::new();
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let cancel = token.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
            _ = int.recv() => tracing::info!("SIGINT: shutting down"),
        }
        cancel.cancel();
    });
    Ok(token)
}
