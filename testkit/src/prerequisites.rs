//! The one policy for tests whose real components may be missing on a machine (root for network
//! namespaces, the control plane, the S3 server, the workspace binaries): without them a test
//! prints `SKIPPED <test>: <reason>` and passes, except under `CACHALOT_E2E_LOCAL=required`
//! (what `scripts/test` and CI set), where it fails: CI never passes by skipping.

/// The variable that turns a skip into a failure.
pub const REQUIRED_ENV: &str = "CACHALOT_E2E_LOCAL";

/// Whether `test` may run: `true` when nothing is `missing`; otherwise prints why it skips and
/// returns `false`, or panics when [`REQUIRED_ENV`] is `required`.
///
/// # Panics
/// When something is missing and the run requires every test to run.
#[must_use]
#[allow(
    clippy::panic,
    reason = "failing the calling test is the point under CI"
)]
pub fn run_or_skip(test: &str, missing: Option<String>) -> bool {
    match missing {
        None => true,
        Some(reason) if std::env::var(REQUIRED_ENV).as_deref() == Ok("required") => {
            panic!("{test}: required but cannot run here: {reason}")
        }
        Some(reason) => {
            eprintln!("SKIPPED {test}: {reason}");
            false
        }
    }
}
