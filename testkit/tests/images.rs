//! Every generated image shape pushes to the real distribution and reads back as pushed.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Instant;

use cachalot_testkit::client::http_client;
use cachalot_testkit::distribution::Distribution;
use cachalot_testkit::image::{
    self, big_image, docker_image, docker_manifest_list, fetch_blob, fetch_manifest, oci_image,
    oci_index, TestImage,
};

const MIB: u64 = 1024 * 1024;

async fn assert_reads_back(registry: &Distribution, repo: &str, tag: &str, image: &TestImage) {
    let client = http_client().unwrap();
    let url = registry.url();
    let by_tag = fetch_manifest(&client, &url, repo, tag).await.unwrap();
    assert_eq!(by_tag.status, 200);
    assert_eq!(
        by_tag.content_type.as_deref(),
        Some(image.media_type.as_str())
    );
    assert_eq!(
        by_tag.digest_header.as_deref(),
        Some(image.manifest_digest.as_str())
    );
    assert_eq!(by_tag.bytes, image.manifest_bytes);
    for child in &image.children {
        let fetched = fetch_manifest(&client, &url, repo, &child.manifest_digest)
            .await
            .unwrap();
        assert_eq!(fetched.status, 200);
        assert_eq!(
            fetched.content_type.as_deref(),
            Some(child.media_type.as_str())
        );
        assert_eq!(fetched.bytes, child.manifest_bytes);
    }
    for blob in image.all_blobs() {
        let fetched = fetch_blob(&client, &url, repo, &blob.digest).await.unwrap();
        assert_eq!(fetched.status, 200, "blob {}", blob.digest);
        assert_eq!(fetched.digest, blob.digest);
        assert_eq!(fetched.size, blob.size);
    }
}

/// Pushes `image` as `repo:tag` and checks that it reads back as pushed.
async fn push_and_read_back(registry: &Distribution, repo: &str, tag: &str, image: &TestImage) {
    image::push(&registry.url(), repo, tag, image)
        .await
        .unwrap();
    assert_reads_back(registry, repo, tag, image).await;
}

#[tokio::test]
async fn a_docker_schema2_image_with_three_layers_reads_back_as_pushed() {
    let registry = Distribution::start().await.unwrap();
    let img = docker_image(1, &[MIB, 2 * MIB, 4 * MIB]).unwrap();
    push_and_read_back(&registry, "library/alpha", "1.0", &img).await;
}

#[tokio::test]
async fn an_oci_image_reads_back_as_pushed() {
    let registry = Distribution::start().await.unwrap();
    let img = oci_image(2, &[100_000, 200_000]).unwrap();
    push_and_read_back(&registry, "library/beta", "latest", &img).await;
}

#[tokio::test]
async fn an_oci_index_and_a_docker_manifest_list_read_back_with_their_children() {
    let registry = Distribution::start().await.unwrap();
    let index = oci_index(3, &[50_000]).unwrap();
    let list = docker_manifest_list(4, &[50_000]).unwrap();
    image::push(&registry.url(), "library/multi", "oci", &index)
        .await
        .unwrap();
    image::push(&registry.url(), "library/multi", "docker", &list)
        .await
        .unwrap();
    assert_reads_back(&registry, "library/multi", "oci", &index).await;
    assert_reads_back(&registry, "library/multi", "docker", &list).await;
}

#[tokio::test]
async fn pushing_the_same_tag_with_another_seed_moves_the_tag() {
    let registry = Distribution::start().await.unwrap();
    let first = docker_image(10, &[1000]).unwrap();
    let second = docker_image(11, &[1000]).unwrap();
    push_and_read_back(&registry, "library/moving", "stable", &first).await;
    push_and_read_back(&registry, "library/moving", "stable", &second).await;
    assert_ne!(first.manifest_digest, second.manifest_digest);
}

#[tokio::test]
async fn a_big_layer_image_is_generated_streamed_and_reads_back_intact() {
    let registry = Distribution::start().await.unwrap();
    let started = Instant::now();
    let img = big_image(42, 110 * MIB).await.unwrap();
    let generated = started.elapsed();
    let layer = &img.layers()[0];
    assert!(layer.size >= 110 * MIB);
    assert!(layer.path().is_some(), "big layer should be file-backed");
    image::push(&registry.url(), "library/big", "1", &img)
        .await
        .unwrap();
    let pushed = started.elapsed();
    assert_reads_back(&registry, "library/big", "1", &img).await;
    eprintln!(
        "generate {generated:?}, push {:?}, read back {:?}",
        pushed - generated,
        started.elapsed() - pushed
    );
}
