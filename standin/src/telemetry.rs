//! Logging of the stand-in processes: human-readable lines on stderr, filtered by `RUST_LOG`
//! (default `info`).
//!
//! Invariant: initialising twice is harmless (the second call is ignored), so tests may call it.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

/// Installs the global subscriber once.
pub fn init() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(true)
        .try_init();
}
