//! Shared set-up of the operator's integration tests (each test file includes it with
//! `mod common;` and uses what it needs):
//! - [`mock_api`]: a `kube::Client` whose API server is a scenario played by the test;
//! - [`node`]: a node's directories, desired states and polling an agent's `/status`;
//! - [`registry_stats`]: what a registry pod's `/stats` reports, for fake probes.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

pub mod mock_api;
pub mod node;

use cachalot_operator::controller::observe::{RegistryStats, UpstreamBudget};

/// A registry pod's `/stats` with a Docker Hub pull budget of `remaining` out of 100 per 6 h.
pub fn registry_stats(hits: u64, misses: u64, stale: u64, remaining: u64) -> RegistryStats {
    RegistryStats {
        hits,
        misses,
        stale,
        upstreams: vec![UpstreamBudget {
            registry: "docker.io".to_string(),
            limit: Some(100),
            remaining: Some(remaining),
            window_seconds: Some(21600),
            source: None,
        }],
        ..RegistryStats::default()
    }
}
