//! Test harnesses for cachalot beyond unit tests.
//!
//! - `fake_apiserver`: starts the kube-like fake API server (Python, kmock 0.8) on 127.0.0.1 for
//!   controller-loop tests on machines without a cluster.
//! - `tests/cluster.rs`: the end-to-end suite against a real cluster; it runs only with
//!   `CACHALOT_E2E=1` and a `KUBECONFIG`, and says why when it skips.

pub mod cluster;
pub mod fake_apiserver;
