//! Which cluster a test of the suite runs against.
//!
//! - `CACHALOT_E2E=1` with a `KUBECONFIG`: that cluster (kind, k3d, anything real), with the
//!   settings of [`Settings::from_env`].
//! - Otherwise the local target ([`LocalCluster`]): a real control plane started on this machine
//!   for the test, when its prerequisites are there (root, `scripts/control-plane`, the workspace
//!   binaries, helm). Without them the test skips and prints why, unless
//!   `CACHALOT_E2E_LOCAL=required` (what `scripts/test` and CI set), where a missing prerequisite
//!   fails the test: CI must never pass by skipping.
//!
//! Invariant: a test body sees only [`Settings`] and, for checks that need the machine itself
//! (the audit log, killing a process), [`Target::local`]; everything else is the same for both.

use crate::cluster::{Settings, SkipReason};
use crate::local::{unavailable_reason, LocalCluster, StartLocalError};

/// Environment variable that makes a missing local prerequisite an error instead of a skip.
pub const LOCAL_REQUIRED_ENV: &str = "CACHALOT_E2E_LOCAL";

/// The cluster a test runs against.
#[derive(Debug)]
pub enum Target {
    /// A cluster given by `KUBECONFIG`.
    External(Settings),
    /// A control plane on this machine, started for this test.
    Local(Box<LocalCluster>, Settings),
}

/// Why no target could be had although one was required.
#[derive(Debug, thiserror::Error)]
pub enum AcquireTargetError {
    /// `CACHALOT_E2E=1` but the settings are wrong.
    #[error("CACHALOT_E2E=1 but: {0}")]
    External(SkipReason),
    /// The local target could not start.
    #[error("local cluster: {0}")]
    Local(#[from] StartLocalError),
}

impl Target {
    /// The suite's settings for this target.
    #[must_use]
    pub fn settings(&self) -> &Settings {
        match self {
            Self::External(s) | Self::Local(_, s) => s,
        }
    }

    /// The local cluster, when the test runs on one.
    #[must_use]
    pub fn local(&self) -> Option<&LocalCluster> {
        match self {
            Self::External(_) => None,
            Self::Local(local, _) => Some(local),
        }
    }
}

/// The target for `test` with `nodes` fake nodes when local; `Ok(None)` means skip (the reason is
/// printed).
///
/// # Errors
/// [`AcquireTargetError`] when a target was asked for and cannot be had.
pub async fn acquire(test: &str, nodes: u8) -> Result<Option<Target>, AcquireTargetError> {
    if std::env::var("CACHALOT_E2E").as_deref() == Ok("1") {
        return Settings::from_env()
            .map(|s| Some(Target::External(s)))
            .map_err(AcquireTargetError::External);
    }
    let required = std::env::var(LOCAL_REQUIRED_ENV).as_deref() == Ok("required");
    if let Some(reason) = unavailable_reason() {
        if required {
            return Err(StartLocalError::Unavailable(reason).into());
        }
        eprintln!("SKIPPED {test}: no cluster: CACHALOT_E2E is not 1 and the local control plane cannot run here: {reason}");
        return Ok(None);
    }
    let local = LocalCluster::start(nodes).await?;
    let settings = local.settings()?;
    Ok(Some(Target::Local(Box::new(local), settings)))
}
