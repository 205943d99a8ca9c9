//! Shared set-up of the operator's integration tests (each test file includes it with
//! `mod common;` and uses what it needs):
//! - [`mock_api`]: a `kube::Client` whose API server is a scenario played by the test;
//! - [`cluster`]: a real control plane with the cachalot image on its fake nodes, the CRD, waits;
//! - [`node`]: a node's directories, desired states and polling an agent's `/status`;
//! - [`registry_stats`]: what a registry pod's `/stats` reports, for fake probes;
//! - [`registry_binary`]: where that binary is (`CACHALOT_E2E_REGISTRY`, else beside the
//!   operator's);
//! - [`spawn_registry`]: a real `cachalot-registry` process, waited for until `/readyz` answers,
//!   and [`admin_stats`]: what such a process's `/stats` says;
//! - [`listed_caches`] and [`hold`]: the operator's caches of owned objects, fed by hand as the
//!   watches would.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

pub mod cluster;
pub mod mock_api;
pub mod node;

use cachalot_operator::controller::observe::{RegistryStats, UpstreamBudget};
use cachalot_operator::controller::owned::{owned_stores, OwnedStores, OwnedWriters};
use cachalot_testkit::client::http_client;
use cachalot_testkit::process::LoggedChild;
use kube::runtime::watcher;
use serde::de::DeserializeOwned;
use serde_json::Value;

/// The `cachalot-registry` binary the tests run: `CACHALOT_E2E_REGISTRY`, else the one built
/// beside the operator's binary. It may not exist (see [`registry_binary`]).
pub fn registry_binary_path() -> std::path::PathBuf {
    std::env::var_os("CACHALOT_E2E_REGISTRY")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            std::path::Path::new(env!("CARGO_BIN_EXE_cachalot-operator"))
                .with_file_name("cachalot-registry")
        })
}

/// [`registry_binary_path`], which must exist.
pub fn registry_binary() -> std::path::PathBuf {
    let binary = registry_binary_path();
    assert!(
        binary.exists(),
        "{} not built: run `cargo build -p cachalot-registry` (scripts/test builds every binary first)",
        binary.display()
    );
    binary
}

/// Caches of owned objects whose watches have listed (nothing yet), and their writers.
pub fn listed_caches() -> (OwnedStores, OwnedWriters) {
    let (stores, mut writers) = owned_stores();
    writers.mark_listed();
    (stores, writers)
}

fn event<K: DeserializeOwned>(object: &Value) -> watcher::Event<K> {
    watcher::Event::Apply(serde_json::from_value(object.clone()).unwrap())
}

/// Puts `object` (JSON naming its `kind`) into its cache, as its watch would deliver it.
pub fn hold(writers: &mut OwnedWriters, object: &Value) {
    match object["kind"].as_str().unwrap() {
        "ConfigMap" => writers.config_maps.apply_watcher_event(&event(object)),
        "Deployment" => writers.deployments.apply_watcher_event(&event(object)),
        "StatefulSet" => writers.stateful_sets.apply_watcher_event(&event(object)),
        "DaemonSet" => writers.daemon_sets.apply_watcher_event(&event(object)),
        "Service" => writers.services.apply_watcher_event(&event(object)),
        "PodDisruptionBudget" => writers
            .pod_disruption_budgets
            .apply_watcher_event(&event(object)),
        other => panic!("not an owned kind: {other}"),
    }
}

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
            observed_at: None,
            rate_limited: None,
        }],
        ..RegistryStats::default()
    }
}

/// Starts `cmd` (a `cachalot-registry serve …`) with its output in `log`, and waits (at most 30 s)
/// until `ready_url` (a `/readyz` URL) answers 200; panics with the log's tail otherwise.
pub async fn spawn_registry(
    cmd: &mut std::process::Command,
    log: &std::path::Path,
    ready_url: &str,
) -> LoggedChild {
    let mut child = LoggedChild::spawn(cmd, log).unwrap();
    let client = http_client().unwrap();
    let ready = child
        .wait_ready(
            std::time::Duration::from_secs(30),
            std::time::Duration::from_millis(50),
            || {
                let request = client.get(ready_url);
                async move { request.send().await.is_ok_and(|r| r.status().is_success()) }
            },
        )
        .await;
    if let Err(e) = ready {
        panic!("cachalot-registry did not start: {e}\n{}", child.log_tail());
    }
    child
}

/// What the registry whose admin base URL is `admin` (`http://127.0.0.1:<port>`) reports on
/// `/stats`.
pub async fn admin_stats(admin: &str) -> Value {
    let body = http_client()
        .unwrap()
        .get(format!("{admin}/stats"))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    serde_json::from_slice(&body).unwrap()
}
