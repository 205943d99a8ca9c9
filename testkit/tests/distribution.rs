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

#[tokio::test]
async fn distribution_in_proxy_mode_pulls_through_from_its_remote() {
    use cachalot_testkit::fault::{FaultProxy, Kind};
    use cachalot_testkit::image::{self, docker_image, fetch_blob, fetch_manifest};

    let upstream = Distribution::start().await.unwrap();
    let img = docker_image(51, &[200_000]).unwrap();
    image::push(&upstream.url(), "library/proxied", "1", &img)
        .await
        .unwrap();
    let counter = FaultProxy::start(&upstream.url()).await.unwrap();
    let reference_proxy = Distribution::start_proxy(&counter.url()).await.unwrap();

    let client = http_client().unwrap();
    let manifest = fetch_manifest(&client, &reference_proxy.url(), "library/proxied", "1")
        .await
        .unwrap();
    assert_eq!(manifest.status, 200);
    assert_eq!(manifest.bytes, img.manifest_bytes);
    let layer = &img.layers()[0];
    let blob = fetch_blob(
        &client,
        &reference_proxy.url(),
        "library/proxied",
        &layer.digest,
    )
    .await
    .unwrap();
    assert_eq!(blob.digest, layer.digest);
    let counts = counter.counts();
    assert!(counts.counted_manifest_gets() >= 1, "{counts:?}");
    assert!(counts.get("GET", Kind::Blob) >= 1, "{counts:?}");
}

#[tokio::test]
async fn stray_registry_env_vars_do_not_reach_the_child() {
    // Each nextest test runs in its own process, so this does not leak into other tests.
    std::env::set_var("REGISTRY_HTTP_ADDR", "256.0.0.1:1");
    std::env::set_var("REGISTRY_STORAGE", "s3");
    let registry = Distribution::start().await.unwrap();
    let status = http_client()
        .unwrap()
        .get(format!("{}/v2/", registry.url()))
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(status, 200);
}
