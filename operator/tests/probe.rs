//! The HTTP probe against real HTTP servers on 127.0.0.1 speaking the registry's and the agent's
//! own wire types, so the operator reads exactly what they write.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::time::Duration;

use axum::routing::get;
use axum::{Json, Router};
use cachalot_operator::controller::observe::{HttpProbe, Probe};
use cachalot_operator::node_agent::protocol::{AgentStatus, ContainerdStatus};
use cachalot_registry::telemetry::{
    Budget, RateLimited, RegistryStats as WireRegistryStats, StatsSnapshot, UpstreamRequestCount,
};

async fn serve(app: Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}")
}

#[tokio::test]
async fn registry_stats_are_read_from_the_registry_wire_type() {
    let snapshot = StatsSnapshot {
        hits: 9,
        misses: 3,
        stale: 1,
        errors: 2,
        served_bytes: 1000,
        upstream_bytes: 400,
        cache_size_bytes: 4096,
        upstream_requests: vec![
            UpstreamRequestCount {
                registry: "docker.io".into(),
                method: "GET".into(),
                status: "200".into(),
                count: 3,
            },
            UpstreamRequestCount {
                registry: "docker.io".into(),
                method: "HEAD".into(),
                status: "200".into(),
                count: 5,
            },
        ],
        registries: BTreeMap::from([
            (
                "docker.io".to_string(),
                WireRegistryStats {
                    hits: 9,
                    budget: Some(Budget {
                        limit: Some(100),
                        remaining: 61,
                        window_seconds: Some(21600),
                        source: None,
                        observed_at: 1_700_000_000,
                        expired: false,
                    }),
                    ..WireRegistryStats::default()
                },
            ),
            ("quay.io".to_string(), WireRegistryStats::default()),
            (
                "ghcr.io".to_string(),
                WireRegistryStats {
                    // A bare 429 (the abuse limit): no figures, only the wait.
                    rate_limited: Some(RateLimited {
                        observed_at: 1_700_000_100,
                        until: 1_700_000_160,
                    }),
                    ..WireRegistryStats::default()
                },
            ),
        ]),
        ..StatsSnapshot::default()
    };
    let body = snapshot.clone();
    let base = serve(Router::new().route("/stats", get(move || async move { Json(body) }))).await;
    let probe = HttpProbe::new(Duration::from_secs(2)).unwrap();
    let stats = probe.registry_stats(base).await.unwrap();
    assert_eq!(
        (stats.hits, stats.misses, stats.stale, stats.errors),
        (9, 3, 1, 2)
    );
    assert_eq!(stats.bytes_served, 1000);
    assert_eq!(stats.bytes_from_upstream, 400);
    assert_eq!(stats.cache_size_bytes, 4096);
    assert_eq!(stats.upstream_requests, 8);
    assert_eq!(
        stats.upstreams.len(),
        2,
        "registries without budget headers or a 429 carry no budget"
    );
    assert_eq!(stats.upstreams[0].registry, "docker.io");
    assert_eq!(stats.upstreams[0].remaining, Some(61));
    assert_eq!(stats.upstreams[0].limit, Some(100));
    assert_eq!(stats.upstreams[0].observed_at, Some(1_700_000_000));
    assert_eq!(stats.upstreams[0].rate_limited, None);
    assert_eq!(stats.upstreams[1].registry, "ghcr.io");
    assert_eq!(stats.upstreams[1].remaining, None);
    assert_eq!(
        stats.upstreams[1]
            .rate_limited
            .map(|r| (r.observed_at, r.until)),
        Some((1_700_000_100, 1_700_000_160))
    );
}

#[tokio::test]
async fn agent_status_is_read_from_the_protocol_type() {
    let status = AgentStatus {
        node: "node-1".into(),
        mirror: "ns/hub".into(),
        generation: "abc".into(),
        ready: true,
        registries: Vec::new(),
        containerd: ContainerdStatus::default(),
        managed_files: vec!["/etc/containerd/certs.d/docker.io/hosts.toml".into()],
        problems: Vec::new(),
    };
    let body = status.clone();
    let base = serve(Router::new().route("/status", get(move || async move { Json(body) }))).await;
    let probe = HttpProbe::new(Duration::from_secs(2)).unwrap();
    assert_eq!(probe.agent_status(base).await.unwrap(), status);
}

#[tokio::test]
async fn probe_errors_are_values_with_the_url_not_hangs() {
    // A listener that accepts and never answers: the probe must give up within its timeout.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let _hold = tokio::spawn(async move {
        let mut held = Vec::new();
        for _ in 0..4 {
            if let Ok((socket, _)) = listener.accept().await {
                held.push(socket);
            }
        }
        held
    });
    let probe = HttpProbe::new(Duration::from_millis(300)).unwrap();
    let started = std::time::Instant::now();
    let error = probe
        .registry_stats(format!("http://{addr}"))
        .await
        .unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(3));
    assert!(
        error.to_string().contains(&format!("http://{addr}/stats")),
        "{error}"
    );

    let base = serve(Router::new().route("/status", get(|| async { "not json" }))).await;
    let error = probe.agent_status(base.clone()).await.unwrap_err();
    assert!(error.to_string().contains("unexpected answer"), "{error}");
}
