//! The harness's real distribution upstream starts, answers the API and cleans up after itself.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use cachalot_testkit::client::http_client;
use cachalot_testkit::distribution::Distribution;

#[tokio::test]
async fn distribution_answers_the_base_endpoint_on_loopback() {
    let registry = Distribution::start().await.unwrap();
    assert!(registry.url().starts_with("http://127.0.0.1:"));
    let response = http_client()
        .unwrap()
        .get(format!("{}/v2/", registry.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers()["docker-distribution-api-version"],
        "registry/2.0"
    );
}

#[tokio::test]
async fn dropping_distribution_kills_it_and_removes_its_storage() {
    let registry = Distribution::start().await.unwrap();
    let storage = registry.storage_dir();
    let url = registry.url();
    assert!(storage.is_dir());
    drop(registry);
    assert!(!storage.exists(), "temp dir left behind");
    let result = http_client()
        .unwrap()
        .get(format!("{url}/v2/"))
        .send()
        .await;
    assert!(result.is_err(), "still answering after drop");
}

#[tokio::test]
async fn two_distributions_run_side_by_side_on_different_ports() {
    let a = Distribution::start().await.unwrap();
    let b = Distribution::start_proxy(&a.url()).await.unwrap();
    assert_ne!(a.addr(), b.addr());
    let client = http_client().unwrap();
    for url in [a.url(), b.url()] {
        let status = client
            .get(format!("{url}/v2/"))
            .send()
            .await
            .unwrap()
            .status();
        assert_eq!(status, 200);
    }
}
