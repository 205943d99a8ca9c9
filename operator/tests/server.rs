//! The operator's HTTP endpoint on 127.0.0.1: metrics text, liveness, readiness gating.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use cachalot_operator::metrics::Metrics;
use cachalot_operator::server::{bind, Health};

#[tokio::test]
async fn readyz_waits_for_startup_checks_and_metrics_expose_reconciles() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let metrics = Arc::new(Metrics::new());
    let ready = Arc::new(AtomicBool::new(false));
    let health = Health {
        metrics: metrics.clone(),
        ready: ready.clone(),
    };
    let (addr, serving) = bind("127.0.0.1:0".parse().unwrap(), health).await.unwrap();
    let server = tokio::spawn(serving);
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let get = |path: &str| client.get(format!("http://{addr}{path}")).send();

    assert_eq!(get("/healthz").await.unwrap().status(), 200);
    assert_eq!(get("/readyz").await.unwrap().status(), 503);
    ready.store(true, Ordering::SeqCst);
    assert_eq!(get("/readyz").await.unwrap().status(), 200);

    metrics.observe_reconcile(Duration::from_millis(12), Some("StatusPatchFailed"));
    metrics.set_leader(true);
    let response = get("/metrics").await.unwrap();
    assert!(response.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("application/openmetrics-text"));
    let text = response.text().await.unwrap();
    assert!(
        text.contains(
            "cachalot_operator_reconcile_failures_total{category=\"StatusPatchFailed\"} 1"
        ),
        "{text}"
    );
    assert!(text.contains("cachalot_operator_leader 1"), "{text}");
    server.abort();
}

#[tokio::test]
async fn binding_a_taken_port_is_a_clear_error() {
    let holder = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = holder.local_addr().unwrap();
    let health = Health {
        metrics: Arc::new(Metrics::new()),
        ready: Arc::new(AtomicBool::new(true)),
    };
    let error = match bind(addr, health).await {
        Ok(_) => panic!("binding a taken port succeeded"),
        Err(e) => e,
    };
    assert!(
        error
            .to_string()
            .contains(&format!("cannot listen on {addr}")),
        "{error}"
    );
}
