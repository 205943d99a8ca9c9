//! The node agent: the only part of cachalot that touches a node. It renders containerd
//! `certs.d/<registry>/hosts.toml` files (or CRI-O `registries.conf.d` drop-ins) for one
//! RegistryMirror, writes them safely under the directory it is given, checks containerd's
//! configuration read-only, and reports per-node problems over HTTP (`GET /status`).
//!
//! Layering: `protocol` (wire types), `names`/`duration`/`render`/`containerd`/`gate`/`plan`
//! are pure; `apply` (files), `reload` (SIGHUP to CRI-O or dockerd) and `agent` (loop, probes, HTTP)
//! do the I/O.
//!
//! Invariants: it never writes outside its certs/drop-in directory, never touches a file without
//! its managed-by marker (unless told to merge), never edits containerd's config or restarts it
//! (CRI-O is only sent SIGHUP, and only when given its pid file), and has no Kubernetes API
//! access.

pub mod agent;
pub mod apply;
pub mod containerd;
pub mod docker;
pub mod duration;
pub mod gate;
pub mod names;
pub mod plan;
pub mod protocol;
pub mod reload;
pub mod render;

pub use agent::{run, run_until, Args, RunError};
