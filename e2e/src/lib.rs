//! Test harnesses for cachalot beyond unit tests.
//!
//! - `tests/cluster.rs`: the end-to-end suite against a real cluster: the one `KUBECONFIG` names
//!   with `CACHALOT_E2E=1`, or else a real control plane started on this machine for each test
//!   (`local`, `target`); it says why when it skips.

pub mod cluster;
pub mod local;
pub mod suite;
pub mod target;
