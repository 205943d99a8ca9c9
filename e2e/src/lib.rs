//! Test harnesses for cachalot beyond unit tests.
//!
//! - `fake_apiserver`: starts the kube-like fake API server (Python, kmock 0.8) on 127.0.0.1 for
//!   controller-loop tests on machines without a cluster.
//! - `tests/cluster.rs`: the end-to-end suite against a real cluster: the one `KUBECONFIG` names
//!   with `CACHALOT_E2E=1`, or else a real control plane started on this machine for each test
//!   (`local`, `target`); it says why when it skips.

pub mod cluster;
pub mod fake_apiserver;
pub mod local;
pub mod suite;
pub mod target;
