//! cachalot-operator: reconciles `RegistryMirror` objects (group `cachalot.dev`) into a running
//! cachalot-registry plus node configuration, and runs the node agent that writes containerd's
//! `hosts.toml` on every node.
//!
//! Layering: `api` holds the CRD types (no I/O); `controller` is the reconcile pipeline
//! (fetch → validate → build → apply → status); `node_agent` is the only code that touches a node.
//! Around them: `cli` (the binary's commands), `leader` (Lease election), `metrics`, `server`
//! (`/metrics`, `/healthz`, `/readyz`), `telemetry` (logs) and `crd` (CRD generation).

pub mod api;
pub mod cli;
pub mod controller;
pub mod crd;
pub mod leader;
pub mod metrics;
pub mod node_agent;
pub mod server;
pub mod telemetry;
