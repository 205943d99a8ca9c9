//! CRD types of `cachalot.dev/v1alpha1`: the `RegistryMirror` spec and status.
//!
//! Invariants:
//! - Pure data: no I/O here; every field carries a `///` doc because it becomes the CRD's
//!   `description` (what `kubectl explain` shows).
//! - Validation that the API server can do cheaply lives in the schema (enums, bounds, patterns,
//!   CEL rules); cross-field checks that need code live in `controller::validate`.
//! - Status is written only by the operator and is deterministic: the same observations give the
//!   same status, so a steady state makes no writes.

mod spec;
mod status;

pub use spec::*;
pub use status::*;

/// The API group of every cachalot custom resource.
pub const GROUP: &str = "cachalot.dev";
/// The finalizer the operator puts on every `RegistryMirror` so node files are removed first.
pub const FINALIZER: &str = "cachalot.dev/node-cleanup";
/// The full name of the CRD, used by the startup check.
pub const CRD_NAME: &str = "registrymirrors.cachalot.dev";
